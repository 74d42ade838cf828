//! Rule evaluation, pure: events and clock ticks in, state changes and firings out.
//!
//! Everything here is decided by the events in stream order and their CloudEvents `time`,
//! never by when the reactor happens to read them, so evaluating the same events from the
//! same state gives the same firings with the same ids: what makes a replay after a crash
//! fire nothing twice (see the module documentation of [`super`]). Only timed conditions
//! (absence, debounce) look at the clock, and their firings are committed before they act.

use std::collections::{HashMap, HashSet, VecDeque};

use chorus_schemas::reaction::ReactionCause;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::config::{ReactorConfig, Rule};
use super::event::Needs;
use super::template::{to_json, EventContext, Expression, Template};

/// One event as rules see it.
pub struct Seen<'a> {
    /// Stream and sequence it was read at.
    pub stream: &'a str,
    /// Sequence in `stream`.
    pub sequence: u64,
    /// The NATS subject it was stored under.
    pub nats_subject: &'a str,
    /// Its CloudEvents `id`.
    pub id: &'a str,
    /// Its CloudEvents `type`.
    pub event_type: &'a str,
    /// Its CloudEvents `subject` (empty when it has none).
    pub subject: &'a str,
    /// The CloudEvent, as expressions see it: the parts the rules need (see [`Rules::needs`]).
    pub event: &'a expr::Value,
    /// The message as stored, to read the whole event for a firing when `event` is not whole.
    pub payload: &'a [u8],
    /// Whether `event` is the whole event.
    pub complete: bool,
    /// Its `time`, Unix milliseconds (the stored time when it has none).
    pub time_ms: i64,
}

impl Seen<'_> {
    /// The whole event, for a firing's actions.
    fn whole(&self) -> Json {
        if !self.complete {
            if let Ok(json) = serde_json::from_slice(self.payload) {
                return json;
            }
        }
        to_json(self.event)
    }

    fn cause(&self) -> ReactionCause {
        ReactionCause {
            stream: self.stream.to_owned(),
            sequence: self.sequence,
            event_id: self.id.to_owned(),
            event_type: self.event_type.to_owned(),
            subject: self.subject.to_owned(),
        }
    }
}

/// A firing: the rule, the key, the cause, and how far its actions got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Firing {
    /// Its id: `<reactor>:<rule>:<stream>:<sequence>` of the cause (`:t` added for a timed
    /// firing), so the same cause always gives the same id.
    pub id: String,
    /// Index of the rule in the configuration.
    pub rule: usize,
    /// The rule's name (the configuration may change between runs).
    pub rule_name: String,
    /// The grouping key.
    pub key: String,
    /// Why it fired.
    pub reason: String,
    /// The event that caused it.
    pub cause: ReactionCause,
    /// The cause event, for the actions' templates (null until read back, for a timed
    /// firing; null for good when its stream no longer holds it).
    pub event: Json,
    /// When it fired, Unix milliseconds (event time, or the deadline of a timed condition).
    pub at_ms: i64,
    /// Actions already done (the next to run).
    pub next_action: usize,
}

/// A deadline waiting in a key's state: an absence or a debounce.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Armed {
    deadline_ms: i64,
    reason: String,
    cause: ReactionCause,
    /// The cause event itself only when it fires at once; a timed firing reads it back
    /// from its stream (keeping every armed key's last event would cost a copy per event).
    #[serde(default, skip_serializing_if = "Json::is_null")]
    event: Json,
}

/// What a rule remembers about one key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyState {
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    window: VecDeque<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_value: Option<Json>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    armed: Option<Armed>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_fired_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    fired_once: bool,
}

/// A rule compiled.
struct Compiled {
    rule: Rule,
    types: Vec<glob::Pattern>,
    expression: Option<Expression>,
    key: Option<Template>,
    changed: Option<Expression>,
    /// Whether events of the rule need the expression context at all.
    needs_context: bool,
}

/// Why an event was not taken: counted, not fatal.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Rules whose match held.
    pub matched: u64,
    /// Firings held back by a throttle or once-per-key.
    pub suppressed: u64,
}

/// The rules and their state in memory; the store holds the same, committed per batch.
pub struct Rules {
    reactor: String,
    compiled: Vec<Compiled>,
    /// State by (rule name, key).
    states: HashMap<(String, String), KeyState>,
    /// Keys changed since the last [`Rules::take_dirty`].
    dirty: HashSet<(String, String)>,
}

/// `*` in a type matches any run of characters.
mod glob {
    #[derive(Clone, Debug)]
    pub struct Pattern(Vec<String>);

    impl Pattern {
        pub fn new(text: &str) -> Self {
            Pattern(text.split('*').map(str::to_owned).collect())
        }

        pub fn matches(&self, text: &str) -> bool {
            let parts = &self.0;
            if parts.len() == 1 {
                return parts[0] == text;
            }
            let (first, last) = (&parts[0], &parts[parts.len() - 1]);
            if !text.starts_with(first.as_str()) || text.len() < first.len() + last.len() {
                return false;
            }
            let mut rest = &text[first.len()..text.len() - last.len()];
            if !text.ends_with(last.as_str()) {
                return false;
            }
            for middle in &parts[1..parts.len() - 1] {
                match rest.find(middle.as_str()) {
                    Some(at) => rest = &rest[at + middle.len()..],
                    None => return false,
                }
            }
            true
        }
    }
}

impl Rules {
    /// Compiles the rules of a validated configuration.
    pub fn new(config: &ReactorConfig) -> Result<Self, String> {
        let compiled = config
            .rules
            .iter()
            .map(|rule| {
                let expression = rule.matches.expression.as_deref().map(Expression::compile_over_events).transpose()?;
                let key = rule.key.as_deref().map(Template::compile).transpose()?;
                let changed = rule
                    .when
                    .as_ref()
                    .and_then(|w| w.changed.as_deref())
                    .map(Expression::compile_over_events)
                    .transpose()?;
                let needs_context = expression.is_some() || key.is_some() || changed.is_some();
                Ok(Compiled {
                    types: rule.matches.types.iter().map(|t| glob::Pattern::new(t)).collect(),
                    rule: rule.clone(),
                    expression,
                    key,
                    changed,
                    needs_context,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Rules { reactor: config.name.clone(), compiled, states: HashMap::new(), dirty: HashSet::new() })
    }

    /// What the rules' expressions (matches, keys, changes) can read of an event: what
    /// [`Seen::event`] must hold.
    pub fn needs(&self) -> Needs {
        let mut needs = Needs::default();
        for c in &self.compiled {
            let templated = c.key.iter().flat_map(Template::expressions);
            for e in c.expression.iter().chain(c.changed.iter()).chain(templated) {
                needs.add_expression(e.text());
            }
        }
        needs
    }

    /// Restores one key's state read from the store.
    pub fn restore(&mut self, rule: String, key: String, state: KeyState) {
        self.states.insert((rule, key), state);
    }

    /// The states changed since the last call, to commit (`None`: removed).
    pub fn take_dirty(&mut self) -> Vec<((String, String), Option<KeyState>)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty.into_iter().map(|k| (k.clone(), self.states.get(&k).cloned())).collect()
    }

    /// Whether some state changed since the last [`Rules::take_dirty`].
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Evaluates every rule of `event.stream` on `event`; firings are appended to `out`.
    pub fn apply(&mut self, event: &Seen<'_>, counts: &mut Counts, out: &mut Vec<Firing>) {
        let ty = event.event_type;
        let mut ctx: Option<EventContext> = None;
        for index in 0..self.compiled.len() {
            let c = &self.compiled[index];
            let m = &c.rule.matches;
            if m.stream != event.stream
                || (!c.types.is_empty() && !c.types.iter().any(|t| t.matches(ty)))
                || (!m.subject.is_empty() && !chorus_backbone::subject::matches_any(&m.subject, event.nats_subject))
            {
                continue;
            }
            if c.needs_context && ctx.is_none() {
                ctx = Some(EventContext::new(event.event, event.stream, event.sequence, event.nats_subject));
            }
            let ctx_ref = ctx.as_ref();
            if let (Some(e), Some(ctx)) = (&c.expression, ctx_ref) {
                if !e.holds(ctx) {
                    continue;
                }
            }
            counts.matched += 1;
            let key = match (&c.key, ctx_ref) {
                (Some(t), Some(ctx)) => match t.render(ctx) {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::debug!(rule = %c.rule.name, error = %e, "reactor: key template failed; event skipped");
                        continue;
                    }
                },
                _ => event.subject.to_owned(),
            };
            let changed_value = match (&c.changed, ctx_ref) {
                (Some(e), Some(ctx)) => Some(e.eval(ctx).map(|v| to_json(&v)).unwrap_or(Json::Null)),
                _ => None,
            };
            self.on_match(index, key, event, changed_value, counts, out);
        }
    }

    fn on_match(
        &mut self,
        index: usize,
        key: String,
        event: &Seen<'_>,
        changed_value: Option<Json>,
        counts: &mut Counts,
        out: &mut Vec<Firing>,
    ) {
        let rule = &self.compiled[index].rule;
        let state_key = (rule.name.clone(), key.clone());
        let state = self.states.entry(state_key.clone()).or_default();
        self.dirty.insert(state_key);
        let t = event.time_ms;
        let reason = match &rule.when {
            None => Some("matched".to_owned()),
            Some(when) => {
                if let (Some(n), Some(within)) = (when.count, when.within) {
                    let window = within.as_millis() as i64;
                    state.window.push_back(t);
                    while state.window.front().is_some_and(|first| *first <= t - window) {
                        state.window.pop_front();
                    }
                    while state.window.len() > n as usize {
                        state.window.pop_front();
                    }
                    if state.window.len() >= n as usize {
                        state.window.clear();
                        Some(format!("{n} events within {}", humantime::format_duration(within)))
                    } else {
                        None
                    }
                } else if let Some(silence) = when.absent_for {
                    state.armed = Some(Armed {
                        deadline_ms: t + silence.as_millis() as i64,
                        reason: format!("no matching event for {}", humantime::format_duration(silence)),
                        cause: event.cause(),
                        event: Json::Null,
                    });
                    None
                } else {
                    let value = changed_value.unwrap_or(Json::Null);
                    let before = state.last_value.replace(value.clone());
                    match before {
                        Some(before) if before != value => Some(format!("changed from {before} to {value}")),
                        _ => None,
                    }
                }
            }
        };
        let Some(reason) = reason else { return };
        if let Some(debounce) = rule.debounce {
            state.armed = Some(Armed {
                deadline_ms: t + debounce.as_millis() as i64,
                reason: format!("{reason}, then quiet for {}", humantime::format_duration(debounce)),
                cause: event.cause(),
                event: Json::Null,
            });
            return;
        }
        let id = format!("{}:{}:{}:{}", self.reactor, rule.name, event.stream, event.sequence);
        let armed = Armed { deadline_ms: t, reason, cause: event.cause(), event: event.whole() };
        if let Some(f) = fire(index, rule, key, state, id, armed, counts) {
            out.push(f);
        }
    }

    /// Fires the timed conditions whose deadline is at or before `now_ms`, for rules on
    /// streams in `ready` (read up to their end: a deadline passed while the reactor was
    /// away is judged only once the events since are known).
    pub fn tick(&mut self, now_ms: i64, ready: &dyn Fn(&str) -> bool, counts: &mut Counts, out: &mut Vec<Firing>) {
        let by_name: HashMap<&str, usize> =
            self.compiled.iter().enumerate().map(|(i, c)| (c.rule.name.as_str(), i)).collect();
        for ((rule_name, key), state) in self.states.iter_mut() {
            let Some(armed) = state.armed.as_ref() else { continue };
            if armed.deadline_ms > now_ms {
                continue;
            }
            let Some(&index) = by_name.get(rule_name.as_str()) else { continue };
            let rule = &self.compiled[index].rule;
            if !ready(&rule.matches.stream) {
                continue;
            }
            let Some(armed) = state.armed.take() else { continue };
            self.dirty.insert((rule_name.clone(), key.clone()));
            let id = format!("{}:{}:{}:{}:t", self.reactor, rule.name, armed.cause.stream, armed.cause.sequence);
            if let Some(f) = fire(index, rule, key.clone(), state, id, armed, counts) {
                out.push(f);
            }
        }
    }
}

/// A firing unless a throttle or once-per-key holds it back.
fn fire(
    index: usize,
    rule: &Rule,
    key: String,
    state: &mut KeyState,
    id: String,
    armed: Armed,
    counts: &mut Counts,
) -> Option<Firing> {
    let at = armed.deadline_ms;
    if rule.once_per_key && state.fired_once {
        counts.suppressed += 1;
        return None;
    }
    if let (Some(throttle), Some(last)) = (rule.throttle, state.last_fired_ms) {
        if at < last + throttle.as_millis() as i64 {
            counts.suppressed += 1;
            return None;
        }
    }
    state.last_fired_ms = Some(at);
    state.fired_once = true;
    Some(Firing {
        id,
        rule: index,
        rule_name: rule.name.clone(),
        key,
        reason: armed.reason,
        cause: armed.cause,
        event: armed.event,
        at_ms: at,
        next_action: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(yaml: &str) -> Rules {
        Rules::new(&ReactorConfig::from_yaml(yaml).unwrap()).unwrap()
    }

    fn event(subject: &str, status: &str, t: i64) -> Json {
        json!({"id": format!("{subject}-{t}"), "type": "io.choria.machine.watcher.nagios.v1.state",
               "subject": subject, "data": {"status": status}, "t": t})
    }

    fn feed(r: &mut Rules, events: &[(u64, Json)]) -> (Vec<Firing>, Counts) {
        let (mut out, mut counts) = (Vec::new(), Counts::default());
        for (seq, e) in events {
            let value = super::super::template::from_json(e);
            let seen = Seen {
                stream: "CHORUS_MACHINE",
                sequence: *seq,
                nats_subject: "choria.machine.watcher.nagios.state",
                id: e["id"].as_str().unwrap(),
                event_type: e["type"].as_str().unwrap(),
                subject: e["subject"].as_str().unwrap(),
                event: &value,
                payload: &[],
                complete: true,
                time_ms: e["t"].as_i64().unwrap(),
            };
            r.apply(&seen, &mut counts, &mut out);
        }
        (out, counts)
    }

    const HEAD: &str = "name: r\nrules:\n  - name: crit\n    match: {stream: CHORUS_MACHINE, type: 'io.choria.machine.watcher.*', expression: 'data.status == \"CRITICAL\"'}\n";

    #[test]
    fn every_match_fires_with_an_id_from_its_cause() {
        let mut r = rules(HEAD);
        let (out, counts) =
            feed(&mut r, &[(1, event("a", "CRITICAL", 0)), (2, event("a", "OK", 1)), (3, event("b", "CRITICAL", 2))]);
        assert_eq!(
            out.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
            ["r:crit:CHORUS_MACHINE:1", "r:crit:CHORUS_MACHINE:3"]
        );
        assert_eq!(out[1].key, "b");
        assert_eq!(counts.matched, 2);
    }

    #[test]
    fn counts_within_a_window_and_throttles() {
        let mut r = rules(&format!("{HEAD}    when: {{count: 3, within: 10s}}\n    throttle: 1m\n"));
        let ev: Vec<_> = [0, 20_000, 21_000, 22_000, 23_000, 24_000, 25_000, 90_000, 91_000, 92_000]
            .iter()
            .enumerate()
            .map(|(i, t)| (i as u64 + 1, event("a", "CRITICAL", *t)))
            .collect();
        let (out, counts) = feed(&mut r, &ev);
        // 20,21,22 → fires at 22 s; 23,24,25 → throttled (within 1 min); 90,91,92 → fires.
        assert_eq!(out.iter().map(|f| f.at_ms).collect::<Vec<_>>(), [22_000, 92_000]);
        assert_eq!(counts.suppressed, 1);
    }

    #[test]
    fn absence_fires_once_per_silence_when_the_stream_is_read() {
        let mut r = rules(&format!("{HEAD}    when: {{absent_for: 5m}}\n"));
        feed(&mut r, &[(1, event("a", "CRITICAL", 0)), (2, event("b", "CRITICAL", 60_000))]);
        let (mut out, mut counts) = (Vec::new(), Counts::default());
        r.tick(400_000, &|_| false, &mut counts, &mut out);
        assert!(out.is_empty(), "not judged before the stream is read to its end");
        r.tick(300_000, &|_| true, &mut counts, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].key.as_str(), out[0].id.as_str()), ("a", "r:crit:CHORUS_MACHINE:1:t"));
        r.tick(10_000_000, &|_| true, &mut counts, &mut out);
        assert_eq!(out.iter().map(|f| f.key.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        r.tick(20_000_000, &|_| true, &mut counts, &mut out);
        assert_eq!(out.len(), 2, "once per silence");
    }

    #[test]
    fn changes_debounce_and_once_per_key() {
        let yaml = "name: r\nrules:\n  - name: flip\n    match: {stream: CHORUS_MACHINE}\n    when: {changed: data.status}\n    debounce: 10s\n    once_per_key: true\n";
        let mut r = rules(yaml);
        let (out, _) = feed(
            &mut r,
            &[
                (1, event("a", "OK", 0)),
                (2, event("a", "OK", 1_000)),
                (3, event("a", "CRITICAL", 2_000)),
                (4, event("a", "OK", 5_000)),
            ],
        );
        assert!(out.is_empty(), "debounced");
        let (mut out, mut counts) = (Vec::new(), Counts::default());
        r.tick(14_000, &|_| true, &mut counts, &mut out);
        assert!(out.is_empty());
        r.tick(15_000, &|_| true, &mut counts, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].cause.sequence, 4, "the last event is the cause");
        assert!(out[0].reason.starts_with("changed from \"CRITICAL\" to \"OK\""), "{}", out[0].reason);
        let (more, _) = feed(&mut r, &[(5, event("a", "CRITICAL", 20_000))]);
        r.tick(40_000, &|_| true, &mut counts, &mut out);
        assert!(more.is_empty() && out.len() == 1 && counts.suppressed == 1, "once per key");
    }

    #[test]
    fn type_globs() {
        let p = glob::Pattern::new("io.choria.*.v1.*");
        assert!(p.matches("io.choria.lifecycle.v1.alive"));
        assert!(!p.matches("io.choria.lifecycle.v2.alive"));
        assert!(glob::Pattern::new("a").matches("a") && !glob::Pattern::new("a").matches("ab"));
        assert!(glob::Pattern::new("*").matches("anything"));
    }
}
