//! `kv` watcher: Choria's key-value poller. While the machine is in a matching state, on
//! every state change and every interval, it reads a key of a bucket on the site into the
//! machine's data store (as `<bucket>_<key>`, or `store_key`). A value that differs from the
//! stored one (or a key deleted that was stored) is `changed` and fires `success_transition`;
//! the same value is `unchanged` (firing only with `on_successful_get`, or with
//! `on_matching_update` when the key was written again); a read that fails is `error` and
//! fires `fail_transition`. Values that look like JSON objects or arrays are stored as
//! such, others as text; `query` keeps one dotted path of an object.

use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::{Bucket, BucketConfig};
use chorus_schemas::machine::KvDetails;
use chorus_schemas::WatcherDetails;
use serde_json::Value;
use tracing::warn;

use super::{next_wake, ticker, Wake, WatcherCtx};
use crate::machine::manifest::KvProperties;

/// When the manifest gives no interval.
const INTERVAL: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Changed,
    Unchanged,
    Error,
    Skipped,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Changed => "changed",
            Outcome::Unchanged => "unchanged",
            Outcome::Error => "error",
            Outcome::Skipped => "skipped",
        }
    }
}

/// `{{ .Identity }}`, `{{ .Machine }}` (`{{ .Name }}`) and `{{ .ID }}` replaced; any other
/// template is an error.
fn expand(text: &str, ctx: &WatcherCtx) -> Result<String, String> {
    let instance = &ctx.shared.instance;
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| format!("{text:?}: `{{{{` without `}}}}`"))?;
        match after[..end].trim() {
            ".Identity" => out.push_str(&instance.identity),
            ".Machine" | ".Name" => out.push_str(&instance.machine),
            ".ID" => out.push_str(&instance.id),
            other => return Err(format!("{text:?}: unknown template {other:?}")),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The value as Choria stores it: a JSON object or array when it reads as one, else text.
fn parse(bytes: &[u8], query: Option<&str>) -> Value {
    let text = String::from_utf8_lossy(bytes);
    let trimmed = text.trim();
    let looks_like = |open: char, close: char| trimmed.starts_with(open) && trimmed.ends_with(close);
    if looks_like('{', '}') || looks_like('[', ']') {
        if let Ok(value) = serde_json::from_str::<Value>(trimmed) {
            return match (query, &value) {
                (Some(path), Value::Object(_)) => chorus_rpc::at_path(&value, path).cloned().unwrap_or(Value::Null),
                _ => value,
            };
        }
    }
    Value::String(text.into_owned())
}

struct Poller {
    props: KvProperties,
    bucket: Option<Arc<dyn Bucket>>,
    previous: Option<Value>,
    revision: u64,
}

impl Poller {
    fn data_key(&self, ctx: &WatcherCtx) -> Result<String, String> {
        let key = expand(self.props.store_key.as_deref().unwrap_or(&self.props.key), ctx)?;
        Ok(if self.props.bucket_prefix { format!("{}_{key}", self.props.bucket) } else { key })
    }

    async fn poll(&mut self, ctx: &WatcherCtx) -> Result<Outcome, String> {
        let backbone = ctx.shared.backbone.as_ref().ok_or("the node has no site to read buckets from")?;
        let bucket = match &self.bucket {
            Some(b) => b.clone(),
            None => {
                let b = backbone.bucket(&BucketConfig::new(&self.props.bucket)).await.map_err(|e| e.to_string())?;
                self.bucket = Some(b.clone());
                b
            }
        };
        let key = expand(&self.props.key, ctx)?;
        let data_key = self.data_key(ctx)?;
        if self.previous.is_none() {
            self.previous = ctx.shared.data.get(&data_key);
        }
        let entry = bucket.get(&key).await.map_err(|e| format!("{}.{key}: {e}", self.props.bucket))?;
        let data = &ctx.shared.data;
        let Some(entry) = entry else {
            if self.previous.take().is_none() {
                return Ok(Outcome::Unchanged);
            }
            data.delete(&data_key).map_err(|e| e.to_string())?;
            self.revision = 0;
            return Ok(Outcome::Changed);
        };
        let value = parse(&entry.value, self.props.query.as_deref());
        let written_again = self.revision > 0 && entry.revision > self.revision;
        self.revision = entry.revision;
        if self.previous.as_ref() != Some(&value) {
            data.put(&data_key, value.clone()).map_err(|e| e.to_string())?;
            self.previous = Some(value);
            return Ok(Outcome::Changed);
        }
        if (self.props.on_matching_update && written_again) || self.props.on_successful_get {
            return Ok(Outcome::Changed);
        }
        Ok(Outcome::Unchanged)
    }
}

pub(super) async fn run(ctx: WatcherCtx, props: KvProperties) {
    let details = |outcome: Outcome, props: &KvProperties| {
        WatcherDetails::Kv(KvDetails {
            state: outcome.as_str().into(),
            bucket: props.bucket.clone(),
            key: props.key.clone(),
            mode: "poll".into(),
        })
    };
    let (mut states, _) = ctx.subscribe();
    let stop = ctx.stop_signal();
    let mut every = ticker(Some(ctx.def.interval.unwrap_or(INTERVAL)));
    let mut announce = ticker(ctx.def.announce_interval);
    let mut poller = Poller { props, bucket: None, previous: None, revision: 0 };
    let mut last = Outcome::Skipped;
    let mut check = true;
    loop {
        // The machine's state, and other machines' (foreign_state_required), now.
        if check && ctx.active_in(&ctx.current_state()) {
            last = match poller.poll(&ctx).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    warn!(machine = %ctx.machine(), watcher = %ctx.name(), error = %e, "kv poll failed");
                    Outcome::Error
                }
            };
            ctx.notify(details(last, &poller.props)).await;
            match last {
                Outcome::Changed => ctx.success().await,
                Outcome::Error => ctx.fail().await,
                Outcome::Unchanged | Outcome::Skipped => {}
            }
        }
        check = false;
        match next_wake(&stop, &mut states, &mut every, &mut announce).await {
            Wake::Stop => return,
            Wake::Check => check = true,
            Wake::Announce => ctx.notify(details(last, &poller.props)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse;
    use serde_json::json;

    #[test]
    fn values_are_stored_as_choria_stores_them() {
        assert_eq!(parse(br#" {"spec": "foo"} "#, None), json!({"spec": "foo"}));
        assert_eq!(parse(b"[1, 2]", None), json!([1, 2]));
        assert_eq!(parse(b"foo", None), json!("foo"));
        assert_eq!(parse(b"{not json}", None), json!("{not json}"));
        assert_eq!(parse(br#"{"a": {"b": [5, 6]}}"#, Some("a.b.1")), json!(6));
    }
}
