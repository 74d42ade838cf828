//! What the fast decode path skips unparsed (unknown attributes and unknown `data` fields),
//! checked against the rules the general path's JSON tree applies to every value: serde's
//! skipping checks syntax only, while building a tree also refuses a lone UTF-16 surrogate
//! escape, a number out of `f64` range and nesting of 128 levels or more. The fast path
//! must refuse exactly what the general path refuses, so skipped values are held to the
//! tree's rules here, at a fraction of the cost of reading them the tree's way.

/// Whether the general path's tree would accept every value of `text`, assuming `text` is
/// syntactically valid JSON (the passes after this one refuse it otherwise). Most events
/// are cleared by one scan that finds none of the constructs those rules are about (no
/// `\u` escape, no exponent, no long digit run, few brackets); any event with one is read
/// in full the tree's way.
pub(super) fn tree_accepts(text: &str) -> bool {
    let bytes = text.as_bytes();
    let plain = match memchr::memchr(b'\\', bytes) {
        #[cfg(target_arch = "x86_64")]
        None => Unescaped::scan(bytes),
        _ => plainly_accepted(bytes),
    };
    // Spelled without escapes, serde_json's raw-value marker shows as these bytes; spelled
    // with `\u` escapes, the scans above have already declined.
    let plain = plain && RAW_VALUE_MARKER.find(bytes).is_none();
    plain || serde_json::from_str::<Validated>(text).is_ok()
}

/// serde_json's marker for a raw value (the `raw_value` feature): the tree reads an object
/// whose first key is this as the JSON text held in its value, not as an object, and refuses
/// it when that value is not a string of JSON or more entries follow. Serde's skipping reads
/// it as any key.
const RAW_VALUE_KEY: &str = "$serde_json::private::RawValue";

static RAW_VALUE_MARKER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(RAW_VALUE_KEY));

/// The scan of [`plainly_accepted`] for text without a backslash, 64 bytes at a time on bit
/// masks (one bit per byte, from SSE2 compares). Without escapes a string is exactly what
/// lies between two quotes, so the bytes outside strings are found with a prefix XOR of the
/// quotes, as simdjson does. x86_64 only: built from scalar loops the masks cost more than
/// [`plainly_accepted`] (1.9 µs against 0.44 µs for a 480-byte event, measured), so other
/// targets use that.
#[cfg(target_arch = "x86_64")]
struct Unescaped {
    /// All ones while the previous block ended inside a string.
    in_string: u64,
    /// 1 when the previous block ended with a digit outside strings.
    digit_carry: u64,
    opens: u32,
    digits: u32,
}

#[cfg(target_arch = "x86_64")]
impl Unescaped {
    fn scan(bytes: &[u8]) -> bool {
        let mut scan = Unescaped { in_string: 0, digit_carry: 0, opens: 0, digits: 0 };
        let mut chunks = bytes.chunks_exact(64);
        for chunk in &mut chunks {
            if !scan.block(chunk.try_into().expect("64-byte chunk")) {
                return false;
            }
        }
        let mut last = [b' '; 64];
        last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        if !scan.block(&last) {
            return false;
        }
        // Enough brackets to nest too deep, or enough digits for one too long a number: the
        // exact scan decides.
        (scan.opens < TREE_DEPTH && (scan.digits as usize) < LONG_DIGITS) || plainly_accepted(bytes)
    }

    /// False when the block has an exponent outside strings.
    fn block(&mut self, block: &[u8; 64]) -> bool {
        let m = Masks::of(block);
        let inside = prefix_xor(m.quotes) ^ self.in_string;
        self.in_string = 0u64.wrapping_sub(inside >> 63);
        let outside = !(inside | m.quotes);
        let digits = m.digits & outside;
        if m.exponents & outside & ((digits << 1) | self.digit_carry) != 0 {
            return false;
        }
        self.digit_carry = digits >> 63;
        self.opens += (m.opens & outside).count_ones();
        self.digits += digits.count_ones();
        true
    }
}

/// One 64-byte block classified: bit i of each mask describes byte i.
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct Masks {
    quotes: u64,
    /// `{` or `[`.
    opens: u64,
    digits: u64,
    /// `e` or `E`.
    exponents: u64,
}

#[cfg(target_arch = "x86_64")]
impl Masks {
    /// SSE2, part of every x86_64 target: 16 bytes per compare.
    fn of(block: &[u8; 64]) -> Masks {
        use std::arch::x86_64::*;
        let mut m = Masks::default();
        for (lane, chunk) in block.chunks_exact(16).enumerate() {
            // SAFETY: the intrinsics need SSE2, which every x86_64 target has; the load reads
            // the 16 bytes of `chunk` and has no alignment requirement.
            unsafe {
                let v = _mm_loadu_si128(chunk.as_ptr().cast());
                let bits = |x: __m128i| u64::from(_mm_movemask_epi8(x) as u16) << (16 * lane);
                let eq = |v: __m128i, c: u8| _mm_cmpeq_epi8(v, _mm_set1_epi8(c as i8));
                m.quotes |= bits(eq(v, b'"'));
                m.opens |= bits(_mm_or_si128(eq(v, b'{'), eq(v, b'[')));
                // A digit is a byte whose distance above '0' is at most 9 (unsigned).
                let above = _mm_sub_epi8(v, _mm_set1_epi8(b'0' as i8));
                m.digits |= bits(_mm_cmpeq_epi8(_mm_min_epu8(above, _mm_set1_epi8(9)), above));
                m.exponents |= bits(eq(_mm_or_si128(v, _mm_set1_epi8(0x20)), b'e'));
            }
        }
        m
    }
}

/// Bit i of the result is the XOR of bits 0..=i of `x`: set from an opening quote up to,
/// not including, its closing quote.
#[cfg(target_arch = "x86_64")]
fn prefix_xor(mut x: u64) -> u64 {
    for shift in [1, 2, 4, 8, 16, 32] {
        x ^= x << shift;
    }
    x
}

/// Nesting the tree refuses: serde_json's recursion limit.
const TREE_DEPTH: u32 = 128;
/// A run of digits this long may not fit in an `f64` (its largest is 309 digits).
const LONG_DIGITS: usize = 300;

/// True when `bytes`, read as JSON, holds nothing the tree's extra rules are about. Errs
/// towards false: it may flag harmless input (which is then read in full), never the reverse.
fn plainly_accepted(bytes: &[u8]) -> bool {
    let mut depth = 0u32;
    let mut digits = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                // Inside a string only escapes matter.
                loop {
                    match memchr::memchr2(b'"', b'\\', &bytes[i..]) {
                        None => return false,
                        Some(at) if bytes[i + at] == b'"' => {
                            i += at + 1;
                            break;
                        }
                        Some(at) => {
                            // A `\u` may be a lone surrogate; input ending in a `\` is not JSON.
                            match bytes.get(i + at + 1) {
                                None | Some(b'u') => return false,
                                Some(_) => i += at + 2,
                            }
                        }
                    }
                }
                digits = 0;
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth >= TREE_DEPTH {
                    return false;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'0'..=b'9' => {
                digits += 1;
                if digits >= LONG_DIGITS {
                    return false;
                }
                i += 1;
                continue;
            }
            // Outside strings an `e` after a digit is an exponent (the ones of `true` and
            // `false` follow letters).
            b'e' | b'E' if digits > 0 => return false,
            _ => {}
        }
        digits = 0;
        i += 1;
    }
    true
}

/// Any JSON value, read the way building a [`serde_json::Value`] reads it (every number
/// parsed, every string unescaped, the same nesting limit) but not kept: it refuses exactly
/// what the tree refuses, at a fraction of the cost.
struct Validated;

impl<'de> serde::Deserialize<'de> for Validated {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValidatedVisitor)
    }
}

struct ValidatedVisitor;

impl<'de> serde::de::Visitor<'de> for ValidatedVisitor {
    type Value = Validated;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Validated, E> {
        Ok(Validated)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Validated, E> {
        Ok(Validated)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Validated, E> {
        Ok(Validated)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Validated, E> {
        Ok(Validated)
    }

    fn visit_str<E>(self, _: &str) -> Result<Validated, E> {
        Ok(Validated)
    }

    fn visit_unit<E>(self) -> Result<Validated, E> {
        Ok(Validated)
    }

    fn visit_none<E>(self) -> Result<Validated, E> {
        Ok(Validated)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Validated, D::Error> {
        serde::Deserialize::deserialize(d)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Validated, A::Error> {
        while seq.next_element::<Validated>()?.is_some() {}
        Ok(Validated)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Validated, A::Error> {
        // The tree reads only the first key for the raw-value marker; what it then does is
        // not this pass's to copy, so such input is refused and left to the general path.
        match map.next_key::<FirstKey>()? {
            None => return Ok(Validated),
            Some(FirstKey { raw_value: true }) => {
                return Err(serde::de::Error::custom("serde_json's raw-value marker as a first key"))
            }
            Some(FirstKey { raw_value: false }) => map.next_value::<Validated>()?,
        };
        while map.next_entry::<Validated, Validated>()?.is_some() {}
        Ok(Validated)
    }
}

/// An object's first key, unescaped: whether it is [`RAW_VALUE_KEY`].
struct FirstKey {
    raw_value: bool,
}

impl<'de> serde::Deserialize<'de> for FirstKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FirstKeyVisitor)
    }
}

struct FirstKeyVisitor;

impl serde::de::Visitor<'_> for FirstKeyVisitor {
    type Value = FirstKey;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<FirstKey, E> {
        Ok(FirstKey { raw_value: key == RAW_VALUE_KEY })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the rules are about, at every offset around the 64-byte blocks of the fast scan:
    /// the scan must agree with building the tree.
    #[test]
    fn agrees_with_the_tree_at_every_block_offset() {
        let deep = |levels: usize| format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
        let values = [
            "1e400".to_owned(),
            "1E400".to_owned(),
            "-0.5e400".to_owned(),
            "1e5".to_owned(),
            "12".to_owned(),
            "9".repeat(400),
            "9".repeat(299),
            "\"\\ud800\"".to_owned(),
            "\"\\u0041\"".to_owned(),
            "\"\\\\u\"".to_owned(),
            "\"a\\\"[[[1e400\"".to_owned(),
            "\"3e5 [ { 77\"".to_owned(),
            "true".to_owned(),
            "false".to_owned(),
            deep(120),
            deep(126),
            deep(127),
            deep(128),
        ];
        for value in &values {
            for pad in 0..140 {
                let text = format!("{{\"pad\":\"{}\",\"x\":{value},\"y\":[1]}}", "p".repeat(pad));
                let tree = serde_json::from_str::<serde_json::Value>(&text).is_ok();
                assert_eq!(tree_accepts(&text), tree, "pad {pad}: {value}");
                if !plainly_accepted(text.as_bytes()) {
                    continue;
                }
                assert!(tree, "the exact scan cleared what the tree refuses; pad {pad}: {value}");
            }
        }
    }

    /// The block scan clears only what the exact scan clears.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_block_scan_is_no_bolder_than_the_exact_one() {
        let mut text = String::from("{");
        let mut cleared = 0;
        for i in 0..300 {
            text.push_str(&format!("\"k{i}\":[{i},\"{}e{i}\",{{\"d\":{i}.5}}],", "x".repeat(i % 70)));
            let closed = format!("{}\"end\":1}}", text);
            if !closed.contains('\\') && Unescaped::scan(closed.as_bytes()) {
                assert!(plainly_accepted(closed.as_bytes()), "{closed}");
                cleared += 1;
            }
        }
        assert!(cleared > 0, "the block scan cleared nothing");
    }
}
