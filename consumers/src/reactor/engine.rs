//! The running reactor: readers, the evaluator, the actor; how it starts, reports and stops.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_backbone::{Backbone, ReplayOptions, StartPosition, StoredMessage};
use chorus_platform::deadletter::{self, DeadLetter};
use chorus_platform::election::{Candidate, Leadership};
use chorus_platform::governor::Governor;
use chorus_platform::{to_message, ReadStatus};
use chorus_rpc::{RpcClient, Transport};
use chorus_runtime::{Backoff, Config, Health, Shutdown, TaskMonitor, Tasks};
use chorus_schemas::reaction::{Reaction, ReactionAction, ReactionOutcome};
use chorus_schemas::EventRecord;
use futures::{FutureExt as _, StreamExt};
use tokio::sync::{mpsc, Semaphore};

use super::actions::{Actuators, RECORD_BACKOFF};
use super::config::ReactorConfig;
use super::error::ReactorError;
use super::event::{self, Needs};
use super::rules::{Counts, Firing, Rules};
use super::store::{Commit, ReactorStore};
use super::template::to_json;

/// How long positions may go unwritten while nothing changes (see `evaluate`).
const POSITION_EVERY: Duration = Duration::from_secs(1);

/// Pauses between failed reads of a stream (the rules' streams and the records stream).
pub(super) const READ_BACKOFF: Backoff = Backoff::doubling(Duration::from_millis(400), Duration::from_secs(10));

/// The reactor's counters.
#[derive(Debug, Default)]
pub struct ReactorStats {
    evaluated: AtomicU64,
    matched: AtomicU64,
    fired: AtomicU64,
    suppressed: AtomicU64,
    actions_succeeded: AtomicU64,
    actions_failed: AtomicU64,
    dead_lettered: AtomicU64,
    pending: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Events read and evaluated.
    pub evaluated: u64,
    /// Rule matches (an event matching two rules counts twice).
    pub matched: u64,
    /// Firings.
    pub fired: u64,
    /// Firings held back by a throttle or once-per-key.
    pub suppressed: u64,
    /// Actions that succeeded.
    pub actions_succeeded: u64,
    /// Actions that failed.
    pub actions_failed: u64,
    /// Messages that were not events, dead-lettered.
    pub dead_lettered: u64,
    /// Firings whose actions are not all done.
    pub pending: u64,
}

impl ReactorStats {
    fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            evaluated: g(&self.evaluated),
            matched: g(&self.matched),
            fired: g(&self.fired),
            suppressed: g(&self.suppressed),
            actions_succeeded: g(&self.actions_succeeded),
            actions_failed: g(&self.actions_failed),
            dead_lettered: g(&self.dead_lettered),
            pending: g(&self.pending),
        }
    }
}

pub(super) struct Shared {
    pub(super) config: ReactorConfig,
    pub(super) backbone: Arc<dyn Backbone>,
    pub(super) store: ReactorStore,
    pub(super) stats: ReactorStats,
    /// Streams read up to where they ended when their reader started.
    caught_up: Mutex<HashMap<String, bool>>,
    pub(super) reading: ReadStatus,
    dry_run: bool,
    pub(super) shutdown: Shutdown,
    /// Whether this instance acts (always, unless it is in an election).
    leadership: Leadership,
    /// With an election: how far the follower has read the records stream.
    followed: Option<Arc<AtomicU64>>,
    /// Why the reactor's records cannot be stored now (the records stream missing, the
    /// broker down): the reactor waits, and says so in health.
    recording: Mutex<Option<String>>,
}

/// A running reactor; a runtime [`Service`](chorus_runtime::Service).
pub struct Reactor {
    shared: Arc<Shared>,
    tasks: Tasks,
}

chorus_runtime::service_of_tasks!(Reactor, tasks, health = reading_health);

impl Shared {
    /// Failing while a stream cannot be read or the records cannot be stored.
    fn health(&self) -> Health {
        let recording = self.recording.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let recorded = match recording {
            Some(why) => Health::failing(why),
            None => Health::ok(),
        };
        self.reading.health().and(recorded).with("leader", self.leadership.is_leader())
    }
}

impl Reactor {
    fn reading_health(&self) -> Health {
        self.shared.health()
    }

    /// Starts reading the rules' streams from the reactor's positions (or, for a stream
    /// met for the first time, from its end) and acting on firings, with RPC actions over
    /// `transport` when given. With `dry_run`, firings are printed on standard output and
    /// recorded nowhere: no action runs and no position moves.
    pub async fn start(
        backbone: Arc<dyn Backbone>,
        transport: Option<Arc<dyn Transport>>,
        config: ReactorConfig,
        dry_run: bool,
        shutdown: Shutdown,
    ) -> Result<Self, ReactorError> {
        config.validate()?;
        let mut rules = Rules::new(&config).map_err(ReactorError::Rules)?;
        let store = ReactorStore::open(&config.state_dir, &config.name)?;
        for (rule, key, state) in store.states()? {
            rules.restore(rule, key, state);
        }
        let rpc = match transport {
            None => None,
            Some(t) => Some(match &config.security {
                Some(security) => security.client(t, config.collective.clone())?,
                None => RpcClient::new(t, config.callerid.clone(), config.collective.clone()),
            }),
        };
        let streams = config.streams();
        let mut reading_streams = streams.clone();
        let (leadership, campaign) = match (&config.election, dry_run) {
            (Some(election), false) => {
                reading_streams.push(config.records_stream.clone());
                let candidate = Candidate::join(&*backbone, &config.name, election)
                    .await
                    .map_err(|e| ReactorError::Election(e.to_string()))?;
                let (leadership, task) = candidate.campaign(shutdown.child());
                (leadership, Some(task))
            }
            _ => (Leadership::alone(), None),
        };
        let followed = campaign.as_ref().map(|_| Arc::new(AtomicU64::new(0)));
        let shared = Arc::new(Shared {
            reading: ReadStatus::starting(reading_streams),
            caught_up: Mutex::new(streams.iter().map(|s| (s.clone(), false)).collect()),
            config,
            backbone: backbone.clone(),
            store,
            stats: ReactorStats::default(),
            dry_run,
            shutdown: shutdown.clone(),
            leadership,
            followed,
            recording: Mutex::new(None),
        });
        let actuators = Arc::new(Actuators {
            backbone,
            rpc,
            http: reqwest::Client::builder().build()?,
            shutdown: shutdown.clone(),
        });
        let mut tasks = Tasks::new("reactor", shutdown);
        // Readers hand on what they have read in chunks (up to a batch): one hand-over, and
        // at most one wake-up of the evaluator, per chunk rather than per event.
        let (read_tx, read_rx) = mpsc::channel(64);
        let (act_tx, act_rx) = mpsc::channel(shared.config.concurrency * 64);
        for stream in streams {
            tasks.spawn("read", read(shared.clone(), stream, read_tx.clone()));
        }
        drop(read_tx);
        if let Some(seen) = &shared.followed {
            tasks.spawn("follow", super::standby::follow(shared.clone(), seen.clone()));
        }
        if let Some(campaign) = campaign {
            // The campaign ends with the shutdown (resigning when it led).
            tasks.spawn("campaign", async move { campaign.await.map_err(|e| ReactorError::Election(e.to_string())) });
        }
        tasks.spawn("evaluate", evaluate(shared.clone(), rules, read_rx, act_tx));
        tasks.spawn("act", act(shared.clone(), actuators, act_rx));
        Ok(Reactor { shared, tasks })
    }

    /// A view for `/metrics` and `/healthz`.
    pub fn monitor(&self) -> Monitor {
        Monitor { shared: self.shared.clone(), tasks: self.tasks.monitor() }
    }

    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Whether this instance acts now (always, unless it is in an election).
    pub fn is_leader(&self) -> bool {
        self.shared.leadership.is_leader()
    }
}

/// A read-only view of a running reactor, for monitoring.
#[derive(Clone)]
pub struct Monitor {
    pub(super) shared: Arc<Shared>,
    pub(super) tasks: TaskMonitor,
}

impl Monitor {
    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Failing when a task failed, a stream cannot be read or the records cannot be stored.
    pub fn health(&self) -> Health {
        self.tasks.health().and(self.shared.health())
    }
}

/// Reads one stream from the reactor's position, following it; reopens after errors.
async fn read(shared: Arc<Shared>, stream: String, out: mpsc::Sender<Vec<StoredMessage>>) -> Result<(), ReactorError> {
    let shutdown = shared.shutdown.clone();
    let mut retry = READ_BACKOFF.retry();
    let mut next: Option<u64> = None;
    loop {
        let opened = async {
            let info = shared.backbone.stream_info(&stream).await?;
            let from = match next {
                Some(n) => n,
                None => match shared.store.position(&stream)? {
                    Some(p) => p + 1,
                    None if shared.config.start == super::config::Start::First => 1,
                    None => {
                        // A stream met for the first time is read from its end; the
                        // position is recorded now so events stored from here on are not
                        // skipped by a restart.
                        if !shared.dry_run {
                            let mut commit = Commit::new();
                            commit.position(&stream, info.last_sequence);
                            shared.store.apply(commit).await?;
                        }
                        info.last_sequence + 1
                    }
                },
            };
            let options = ReplayOptions { start: StartPosition::Sequence(from), filter_subjects: vec![], follow: true };
            let messages = shared.backbone.replay(&stream, options).await?;
            Ok::<_, ReactorError>((messages, from, info.last_sequence))
        };
        let (mut messages, from, end) = match tokio::select! { r = opened => r, _ = shutdown.requested() => return Ok(()) }
        {
            Ok(o) => o,
            Err(e) => {
                shared.reading.waiting(stream.clone(), e.to_string());
                tracing::warn!(%stream, error = %e, "reactor: cannot read the stream; retrying");
                if !retry.wait(&shutdown).await {
                    return Ok(());
                }
                continue;
            }
        };
        shared.reading.reading(&stream);
        retry.reset();
        next = Some(from);
        if from > end {
            shared.set_caught_up(&stream);
        }
        let chunk_size = shared.config.batch_size;
        loop {
            let item = tokio::select! { m = messages.next() => m, _ = shutdown.requested() => return Ok(()) };
            // What is already read is taken with it, without waiting.
            let (mut chunk, mut failed, mut ended) = (Vec::new(), None, false);
            let mut item = item;
            loop {
                match item {
                    Some(Ok(m)) => chunk.push(m),
                    Some(Err(e)) => failed = Some(e),
                    None => ended = true,
                }
                if failed.is_some() || ended || chunk.len() >= chunk_size {
                    break;
                }
                match messages.next().now_or_never() {
                    Some(next) => item = next,
                    None => break,
                }
            }
            if let Some(last) = chunk.last() {
                next = Some(last.sequence + 1);
                let at_end = last.sequence >= end;
                if out.send(chunk).await.is_err() {
                    return Ok(());
                }
                if at_end {
                    shared.set_caught_up(&stream);
                }
            }
            match failed {
                Some(e) => {
                    shared.reading.waiting(stream.clone(), e.to_string());
                    tracing::warn!(%stream, error = %e, "reactor: reading the stream failed; reopening");
                    break;
                }
                None if ended => break,
                None => {}
            }
        }
        if !retry.wait(&shutdown).await {
            return Ok(());
        }
    }
}

impl Shared {
    fn set_caught_up(&self, stream: &str) {
        self.caught_up.lock().unwrap_or_else(|e| e.into_inner()).insert(stream.to_owned(), true);
    }

    fn is_caught_up(&self, stream: &str) -> bool {
        self.caught_up.lock().unwrap_or_else(|e| e.into_inner()).get(stream).copied().unwrap_or(false)
    }

    /// Publishes reactor records until they are stored (their ids make this idempotent).
    async fn record(&self, records: Vec<Reaction>) -> Result<(), ReactorError> {
        if records.is_empty() {
            return Ok(());
        }
        let messages = records
            .into_iter()
            .map(|r| {
                let id = r.event_id();
                let mut record = EventRecord::new(r, 0);
                record.id = id;
                if let Some(site) = &self.config.site {
                    record = record.with_site(site.clone());
                }
                to_message(&record).map_err(|e| ReactorError::Rules(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut retry = RECORD_BACKOFF.retry();
        loop {
            match self.backbone.publish_batch(messages.clone()).await {
                Ok(_) => {
                    *self.recording.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reactor: recording reactions failed; retrying");
                    *self.recording.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(format!("cannot record reactions (nothing acts meanwhile): {e}"));
                    if !retry.wait(&self.shutdown).await {
                        return Err(e.into());
                    }
                }
            }
        }
    }

    /// Becoming the leader: reads what a former leader did to its end, then announces and
    /// hands on every pending firing from its first action not done. `false` at shutdown.
    async fn take_over(&self, actor: &mpsc::Sender<Firing>) -> Result<bool, ReactorError> {
        if let Some(seen) = &self.followed {
            tracing::info!(reactor = %self.config.name, "reactor: leading; reading what was done before");
            super::standby::catch_up(self, seen).await?;
        }
        let pending = self.settle_all(self.store.firings()?)?;
        self.stats.pending.store(0, Ordering::Relaxed);
        // Announced again (deduplicated by id), then their remaining actions.
        self.dispatch(pending, actor).await
    }

    /// Announces firings (their `fired` records) and hands those with actions to the actor;
    /// a firing without actions is done once announced, and forgetting it need not be
    /// durable at once (announced again after a crash, it is deduplicated). `false` when the
    /// actor is gone (shutdown).
    async fn dispatch(&self, firings: Vec<Firing>, actor: &mpsc::Sender<Firing>) -> Result<bool, ReactorError> {
        self.record(firings.iter().map(|f| self.fired_record(f)).collect()).await?;
        let (with_actions, done): (Vec<Firing>, Vec<Firing>) =
            firings.into_iter().partition(|f| self.actions_of(f).is_some_and(|a| !a.is_empty()));
        if !done.is_empty() {
            let mut commit = Commit::new();
            for f in &done {
                commit.done(&f.id);
            }
            self.store.apply_lazily(commit)?;
        }
        self.stats.pending.fetch_add(with_actions.len() as u64, Ordering::Relaxed);
        for f in with_actions {
            if actor.send(f).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `firings` with what another instance recorded as done skipped; those with nothing
    /// left to do are dropped from the store (lazily: forgetting need not be durable).
    fn settle_all(&self, firings: Vec<Firing>) -> Result<Vec<Firing>, ReactorError> {
        if self.followed.is_none() {
            return Ok(firings);
        }
        let mut out = Vec::with_capacity(firings.len());
        let mut commit = Commit::new();
        for f in firings {
            let actions = self.actions_of(&f).map_or(0, <[_]>::len);
            if actions == 0 {
                out.push(f);
                continue;
            }
            let id = f.id.clone();
            match super::standby::settle(self, f, actions)? {
                Some(f) => out.push(f),
                None => commit.done(&id),
            }
        }
        self.store.apply_lazily(commit)?;
        Ok(out)
    }

    /// The actions of the firing's rule, found by name (the configuration may have
    /// changed since it fired); `None` when the rule is gone.
    fn actions_of(&self, f: &Firing) -> Option<&[super::config::Action]> {
        let rules = &self.config.rules;
        rules
            .get(f.rule)
            .filter(|r| r.name == f.rule_name)
            .or_else(|| rules.iter().find(|r| r.name == f.rule_name))
            .map(|r| r.actions.as_slice())
    }

    fn fired_record(&self, f: &Firing) -> Reaction {
        let mut r = Reaction::new(&self.config.name, &f.rule_name, ReactionOutcome::Fired, &f.id, &f.key, &f.reason);
        r.cause = Some(f.cause.clone());
        r.time = f.at_ms.div_euclid(1000);
        r
    }
}

/// Evaluates events in batches; commits state, positions and firings together; hands
/// firings to the actor.
async fn evaluate(
    shared: Arc<Shared>,
    mut rules: Rules,
    mut input: mpsc::Receiver<Vec<StoredMessage>>,
    actor: mpsc::Sender<Firing>,
) -> Result<(), ReactorError> {
    let shutdown = shared.shutdown.clone();
    // Made when the first letter is to be stored, not before evaluating anything.
    let mut dead_letter_stream = false;
    let mut leadership = shared.leadership.clone();
    let mut leading = false;
    let mut tick = tokio::time::interval(shared.config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(shared.config.batch_size);
    let needs = rules.needs();
    // Positions not yet written: a batch that changed no state and fired nothing need not
    // move them at once (evaluating its events again after a crash does nothing either), so
    // they are written with the next batch that does, or after POSITION_EVERY.
    let mut unwritten: HashMap<String, u64> = HashMap::new();
    let mut positions_written = tokio::time::Instant::now();
    loop {
        if !shared.dry_run && leadership.is_leader() != leading {
            leading = !leading;
            if leading && !shared.take_over(&actor).await? {
                return Ok(());
            }
        }
        batch.clear();
        let mut firings = Vec::new();
        let mut counts = Counts::default();
        tokio::select! {
            biased;
            _ = shutdown.requested() => return Ok(()),
            _ = leadership.changed() => continue,
            chunk = input.recv() => {
                let Some(chunk) = chunk else { return Ok(()) };
                batch.extend(chunk);
                while batch.len() < shared.config.batch_size {
                    match input.try_recv() {
                        Ok(chunk) => batch.extend(chunk),
                        Err(_) => break,
                    }
                }
            }
            _ = tick.tick() => {
                let now = chrono::Utc::now().timestamp_millis();
                rules.tick(now, &|s| shared.is_caught_up(s), &mut counts, &mut firings);
            }
        }
        let mut commit = Commit::new();
        let mut letters = Vec::new();
        for m in &batch {
            match event::read(m, &needs) {
                Ok(event) => rules.apply(&event.seen(m), &mut counts, &mut firings),
                Err((code, reason)) => {
                    tracing::warn!(stream = %m.stream, sequence = m.sequence, %reason, "reactor: dead-lettering");
                    letters.push(DeadLetter::new(&shared.config.name, m, &code, reason));
                }
            }
        }
        // Timed firings read their cause back: the state keeps only where it is.
        for f in firings.iter_mut().filter(|f| f.event.is_null()) {
            match shared.backbone.get(&f.cause.stream, f.cause.sequence).await {
                Ok(Some(m)) => f.event = event::read(&m, &Needs::All).map(|e| to_json(&e.value)).unwrap_or_default(),
                Ok(None) => {}
                Err(e) => tracing::warn!(firing = %f.id, error = %e, "reactor: reading the cause back failed"),
            }
        }
        let stats = &shared.stats;
        stats.evaluated.fetch_add(batch.len() as u64, Ordering::Relaxed);
        stats.matched.fetch_add(counts.matched, Ordering::Relaxed);
        stats.suppressed.fetch_add(counts.suppressed, Ordering::Relaxed);
        if shared.dry_run {
            for f in &firings {
                println!("{}", serde_json::to_string(&shared.fired_record(f)).unwrap_or_default());
            }
            rules.take_dirty();
            continue;
        }
        for m in &batch {
            match unwritten.get_mut(m.stream.as_str()) {
                Some(seq) => *seq = m.sequence,
                None => {
                    unwritten.insert(m.stream.clone(), m.sequence);
                }
            }
        }
        let positions_due = !unwritten.is_empty() && positions_written.elapsed() >= POSITION_EVERY;
        if firings.is_empty() && letters.is_empty() && !rules.has_dirty() && !positions_due {
            continue;
        }
        for ((rule, key), state) in rules.take_dirty() {
            commit.state(&rule, &key, state.as_ref());
        }
        for (stream, seq) in unwritten.drain() {
            commit.position(&stream, seq);
        }
        positions_written = tokio::time::Instant::now();
        for f in &firings {
            commit.firing(f);
        }
        if !letters.is_empty() {
            let mut retry = RECORD_BACKOFF.retry();
            while !dead_letter_stream {
                match deadletter::ensure_stream(&*shared.backbone).await {
                    Ok(()) => dead_letter_stream = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "reactor: cannot make the dead-letter stream; retrying");
                        if !retry.wait(&shutdown).await {
                            return Ok(());
                        }
                    }
                }
            }
            while let Err(e) = deadletter::publish(&*shared.backbone, &letters).await {
                tracing::warn!(error = %e, "reactor: dead letters not stored; retrying");
                if !retry.wait(&shutdown).await {
                    return Ok(());
                }
            }
            stats.dead_lettered.fetch_add(letters.len() as u64, Ordering::Relaxed);
        }
        // The firings, the state that produced them and the position past their causes
        // become durable at once: a crash before this re-evaluates the same events into
        // the same firings; a crash after it finds them pending. A batch that fired nothing
        // is written atomically but not waited for: the store keeps its writes in order, so
        // a crash loses only a suffix of such batches, which are evaluated again.
        if firings.is_empty() {
            shared.store.apply_lazily(commit)?;
        } else {
            shared.store.apply(commit).await?;
        }
        stats.fired.fetch_add(firings.len() as u64, Ordering::Relaxed);
        if !leading {
            // A standby keeps its firings pending; it acts on them if it takes over.
            continue;
        }
        let firings = shared.settle_all(firings)?;
        if !shared.dispatch(firings, &actor).await? {
            return Ok(());
        }
    }
}

/// Runs firings' actions, `concurrency` firings at once.
async fn act(
    shared: Arc<Shared>,
    actuators: Arc<Actuators>,
    mut firings: mpsc::Receiver<Firing>,
) -> Result<(), ReactorError> {
    let permits = Arc::new(Semaphore::new(shared.config.concurrency));
    let mut running = tokio::task::JoinSet::new();
    // Firings queued or running: one handed on again by a takeover is not run twice at once.
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        let firing = tokio::select! {
            f = firings.recv() => f,
            Some(done) = running.join_next(), if !running.is_empty() => {
                done.map_err(|e| ReactorError::Rules(format!("an action task failed: {e}")))??;
                continue;
            }
        };
        let Some(firing) = firing else { break };
        if !in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(firing.id.clone()) {
            shared.stats.pending.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        let permit = permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (shared, actuators, in_flight) = (shared.clone(), actuators.clone(), in_flight.clone());
        running.spawn(async move {
            let _permit = permit;
            let id = firing.id.clone();
            let result = run_firing(&shared, &actuators, firing).await;
            in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            result
        });
    }
    while let Some(done) = running.join_next().await {
        done.map_err(|e| ReactorError::Rules(format!("an action task failed: {e}")))??;
    }
    Ok(())
}

async fn run_firing(shared: &Shared, actuators: &Actuators, mut firing: Firing) -> Result<(), ReactorError> {
    let actions = match shared.actions_of(&firing) {
        Some(actions) => actions.to_vec(),
        None => {
            tracing::warn!(rule = %firing.rule_name, firing = %firing.id, "reactor: the rule is gone; its firing is dropped");
            Vec::new()
        }
    };
    let rule = shared.config.rules.iter().find(|r| r.name == firing.rule_name);
    let mut lease = None;
    let mut no_lease = None;
    if let (Some(rule), true) = (rule, firing.next_action < actions.len()) {
        if let Some(name) = &rule.governor {
            let holder = format!("{}:{}", shared.config.name, firing.id);
            let claimed = async {
                let governor = Governor::open(&*shared.backbone, name).await?;
                governor.claim(&holder, rule.governor_timeout, &shared.shutdown).await
            };
            match claimed.await {
                Ok(Some(l)) => lease = Some(l),
                Ok(None) if shared.shutdown.is_requested() => return Ok(()),
                Ok(None) => no_lease = Some(format!("governor {name}: no lease within {:?}", rule.governor_timeout)),
                Err(e) => no_lease = Some(format!("governor {name}: {e}")),
            }
        }
    }
    while firing.next_action < actions.len() {
        if shared.shutdown.is_requested() || !shared.leadership.is_leader() {
            // Resumed from this action after the restart, or by the next leader.
            return Ok(());
        }
        let index = firing.next_action;
        let action = &actions[index];
        let outcome = match &no_lease {
            Some(why) => super::actions::Outcome::failed(why.clone()),
            None => actuators.run(&firing, index, action).await,
        };
        let counter = if outcome.ok { &shared.stats.actions_succeeded } else { &shared.stats.actions_failed };
        counter.fetch_add(1, Ordering::Relaxed);
        if !outcome.ok {
            tracing::warn!(firing = %firing.id, action = index, detail = %outcome.detail, "reactor: action failed");
        }
        let mut record = Reaction::new(
            &shared.config.name,
            &firing.rule_name,
            if outcome.ok { ReactionOutcome::Succeeded } else { ReactionOutcome::Failed },
            &firing.id,
            &firing.key,
            &firing.reason,
        );
        record.cause = Some(firing.cause.clone());
        record.action = Some(ReactionAction {
            index: index as u32,
            kind: action.kind().into(),
            detail: outcome.detail,
            attempts: outcome.attempts,
        });
        shared.record(vec![record]).await?;
        firing.next_action += 1;
        let mut commit = Commit::new();
        if firing.next_action < actions.len() {
            commit.firing(&firing);
        } else {
            commit.done(&firing.id);
        }
        shared.store.apply(commit).await?;
    }
    if let Some(lease) = lease {
        if let Err(e) = lease.release().await {
            tracing::warn!(firing = %firing.id, error = %e, "reactor: releasing the governor lease failed; it expires");
        }
    }
    if actions.is_empty() {
        let mut commit = Commit::new();
        commit.done(&firing.id);
        shared.store.apply(commit).await?;
    }
    shared.stats.pending.fetch_sub(1, Ordering::Relaxed);
    Ok(())
}
