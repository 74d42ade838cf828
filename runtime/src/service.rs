//! How every long-running part of Chorus starts, reports its health and stops.
//!
//! * [`Shutdown`]: the stop request a process hands down to its services and a service to
//!   its tasks. Signals are turned into a shutdown by the binary only; libraries never
//!   install signal handlers.
//! * [`Tasks`]: the tasks of one service, spawned under its shutdown. A task that fails,
//!   panics or ends before it was asked to stop is recorded the moment it ends, so health
//!   turns bad within the next probe rather than at exit.
//! * [`Service`]: what a running part is to its owner: a name, its [`Health`], and `stop`,
//!   which waits for its tasks and reports every failure ([`ServiceError`]).
//! * [`Services`]: a list of services under one shutdown, stopped in reverse order of
//!   start (what started last depends on what started first) with every error reported.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::FutureExt as _;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Any error a task may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request to stop, shared by everything one process or one service runs. Cheap to clone;
/// every clone sees the same request.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    /// A shutdown nobody has requested yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A shutdown requested with this one, or on its own (one service of many).
    pub fn child(&self) -> Self {
        Shutdown { token: self.token.child_token() }
    }

    /// Requests the stop; every holder sees it.
    pub fn request(&self) {
        self.token.cancel();
    }

    /// Whether the stop was requested.
    pub fn is_requested(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when the stop is requested (at once if it was). Cancel-safe.
    pub async fn requested(&self) {
        self.token.cancelled().await
    }

    /// [`Shutdown::requested`] as a future that owns what it needs (for `axum`'s graceful
    /// shutdown and other APIs that want a `'static` future).
    pub fn requested_owned(&self) -> impl Future<Output = ()> + Send + 'static {
        self.token.clone().cancelled_owned()
    }
}

/// What a service says about itself on `/healthz`: healthy or not, why not, and details of
/// its own (lag, checkpoint, what it reads).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Health {
    /// Whether the service does its job now.
    pub healthy: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Service-specific details, flattened into the JSON.
    #[serde(flatten)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl Health {
    /// Healthy, without details.
    pub fn ok() -> Self {
        Health { healthy: true, reason: None, details: Default::default() }
    }

    /// Not healthy, for `reason`.
    pub fn failing(reason: impl Into<String>) -> Self {
        Health { healthy: false, reason: Some(reason.into()), details: Default::default() }
    }

    /// Adds a detail.
    pub fn with(mut self, key: &str, value: impl Serialize) -> Self {
        self.details.insert(key.to_string(), serde_json::to_value(value).unwrap_or(serde_json::Value::Null));
        self
    }

    /// This health, turned bad by `other` when `other` is bad (its reason comes first).
    pub fn and(mut self, other: Health) -> Self {
        if !other.healthy {
            self.reason = Some(match self.reason.take() {
                Some(mine) if !self.healthy => format!("{}; {mine}", other.reason.unwrap_or_default()),
                _ => other.reason.unwrap_or_default(),
            });
            self.healthy = false;
        }
        self.details.extend(other.details);
        self
    }
}

/// One task of a service that failed: returned an error, panicked, or ended unasked.
#[derive(Clone, Debug)]
pub struct TaskFailure {
    /// The task's name within its service.
    pub task: String,
    /// What ended it.
    pub error: Arc<dyn std::error::Error + Send + Sync>,
}

impl fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.task, self.error)
    }
}

/// A service that did not stop cleanly: every task failure it had, in the order they ended.
#[derive(Debug)]
pub struct ServiceError {
    /// The service's name.
    pub service: String,
    /// Its failures (at least one).
    pub failures: Vec<TaskFailure>,
}

impl ServiceError {
    /// One failure of `service`, outside any task (a final flush, a drain).
    pub fn new(service: impl Into<String>, task: impl Into<String>, error: impl Into<BoxError>) -> Self {
        ServiceError {
            service: service.into(),
            failures: vec![TaskFailure { task: task.into(), error: Arc::from(error.into()) }],
        }
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.service)?;
        for (i, failure) in self.failures.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{failure}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServiceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.failures.first().map(|f| &*f.error as &(dyn std::error::Error + 'static))
    }
}

/// A task that ended on its own before the service was asked to stop.
#[derive(Debug, thiserror::Error)]
#[error("ended before it was asked to stop")]
pub struct EndedUnasked;

/// A task that panicked.
#[derive(Debug, thiserror::Error)]
#[error("panicked: {0}")]
pub struct Panicked(pub String);

#[derive(Default)]
struct TaskState {
    failures: Mutex<Vec<TaskFailure>>,
}

impl TaskState {
    fn record(&self, service: &str, task: &str, error: Arc<dyn std::error::Error + Send + Sync>) {
        tracing::error!(service, task, %error, "task failed");
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).push(TaskFailure { task: task.to_string(), error });
    }

    fn failures(&self) -> Vec<TaskFailure> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The tasks of one service, spawned under its [`Shutdown`].
pub struct Tasks {
    service: Arc<str>,
    shutdown: Shutdown,
    set: JoinSet<()>,
    state: Arc<TaskState>,
}

impl Tasks {
    /// Tasks of `service`, stopped by `shutdown` (usually a child of the process's).
    pub fn new(service: impl Into<Arc<str>>, shutdown: Shutdown) -> Self {
        Tasks { service: service.into(), shutdown, set: JoinSet::new(), state: Arc::default() }
    }

    /// The service's name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The shutdown the tasks watch.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Spawns a task that runs until the shutdown is requested. Ending earlier, with an
    /// error or a panic, is recorded as a failure at once.
    pub fn spawn<F, E>(&mut self, task: &'static str, future: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.spawn_inner(task, future, true);
    }

    /// Spawns a task that may end on its own (a startup job, a drain): only an error or a
    /// panic is a failure.
    pub fn spawn_finite<F, E>(&mut self, task: &'static str, future: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.spawn_inner(task, future, false);
    }

    fn spawn_inner<F, E>(&mut self, task: &'static str, future: F, runs_until_shutdown: bool)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let state = self.state.clone();
        let shutdown = self.shutdown.clone();
        let service = self.service.clone();
        self.set.spawn(async move {
            let ended = std::panic::AssertUnwindSafe(future).catch_unwind().await;
            let failure: Option<Arc<dyn std::error::Error + Send + Sync>> = match ended {
                Ok(Ok(())) if runs_until_shutdown && !shutdown.is_requested() => Some(Arc::new(EndedUnasked)),
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(Arc::from(e.into())),
                Err(panic) => Some(Arc::new(Panicked(panic_message(&panic)))),
            };
            if let Some(error) = failure {
                state.record(&service, task, error);
            }
        });
    }

    /// A cheap handle that reads the tasks' health from anywhere (an HTTP handler).
    pub fn monitor(&self) -> TaskMonitor {
        TaskMonitor { service: self.service.clone(), state: self.state.clone(), shutdown: self.shutdown.clone() }
    }

    /// Healthy until a task fails or the service is stopped.
    pub fn health(&self) -> Health {
        self.monitor().health()
    }

    /// Whether a task failed; see [`TaskMonitor::failed`].
    pub fn failed(&self) -> bool {
        self.state.failures().iter().len() > 0
    }

    /// Requests the shutdown, waits for every task and reports every failure, including
    /// those that happened while running.
    pub async fn stop(&mut self) -> Result<(), ServiceError> {
        self.shutdown.request();
        self.join().await
    }

    /// Waits for every task to end without requesting the shutdown (the caller did, or the
    /// tasks end on their own).
    pub async fn join(&mut self) -> Result<(), ServiceError> {
        while let Some(joined) = self.set.join_next().await {
            if let Err(e) = joined {
                if e.is_panic() {
                    self.state.record(&self.service, "task", Arc::new(Panicked(panic_message(&e.into_panic()))));
                }
            }
        }
        let failures = self.state.failures();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(ServiceError { service: self.service.to_string(), failures })
        }
    }

    /// Aborts the tasks still running (after a stop that took too long: what they hold must
    /// be safe to drop, as an outbox's undelivered events are). Aborted tasks are not
    /// failures.
    pub fn abort(&mut self) {
        self.set.abort_all();
    }

    /// Whether every task has ended.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// Reads a service's task health from anywhere; see [`Tasks::monitor`].
#[derive(Clone)]
pub struct TaskMonitor {
    service: Arc<str>,
    state: Arc<TaskState>,
    shutdown: Shutdown,
}

impl TaskMonitor {
    /// The service's name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Whether a task failed (returned an error, panicked or ended unasked): the service no
    /// longer does its whole job and will not recover by itself.
    pub fn failed(&self) -> bool {
        !self.state.failures().is_empty()
    }

    /// Not healthy once a task failed (the first failure is the reason) or a stop was
    /// requested (a stopping service no longer does its job).
    pub fn health(&self) -> Health {
        let failures = self.state.failures();
        match failures.first() {
            Some(first) => Health::failing(format!("task {first}")),
            None if self.shutdown.is_requested() => Health::failing("stopped"),
            None => Health::ok(),
        }
    }
}

#[async_trait]
impl crate::ops::Observable for TaskMonitor {
    fn name(&self) -> &str {
        &self.service
    }

    fn health(&self) -> Health {
        TaskMonitor::health(self)
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// A long-running part of Chorus, as its owner sees it.
#[async_trait]
pub trait Service: Send + Sync {
    /// The name in logs, health and errors (`provisioner`, `replicator`, `agent node1`).
    fn name(&self) -> &str;

    /// Whether it does its job now, and why not.
    fn health(&self) -> Health;

    /// Whether it failed for good (a task ended with an error): a process running only this
    /// service should stop, report it and let its supervisor restart it.
    fn failed(&self) -> bool {
        false
    }

    /// Stops it: requests its shutdown, waits for its tasks (after their drain: events in
    /// flight stored, checkpoints written) and reports every failure it had. Stopping a
    /// stopped service returns at once.
    async fn stop(&mut self) -> Result<(), ServiceError>;
}

/// Implements [`Service`] for a type whose job is done by one [`Tasks`] field: its name,
/// health, failure and stop all come from the tasks. With `health = method`, the type's own
/// `fn method(&self) -> Health` is added to the tasks' health (a service that runs but is not
/// ready, such as a consumer whose stream does not exist yet).
///
/// ```ignore
/// struct Exporter { stats: Stats, tasks: Tasks }
/// chorus_runtime::service_of_tasks!(Exporter, tasks);
/// ```
#[macro_export]
macro_rules! service_of_tasks {
    ($ty:ty, $field:ident) => {
        $crate::service_of_tasks!($ty, $field, |_s: &$ty| $crate::Health::ok());
    };
    ($ty:ty, $field:ident, health = $health:ident) => {
        $crate::service_of_tasks!($ty, $field, |s: &$ty| s.$health());
    };
    ($ty:ty, $field:ident, $extra:expr) => {
        #[$crate::service::__async_trait]
        impl $crate::Service for $ty {
            fn name(&self) -> &str {
                self.$field.service()
            }

            fn health(&self) -> $crate::Health {
                let extra: fn(&$ty) -> $crate::Health = $extra;
                self.$field.health().and(extra(self))
            }

            fn failed(&self) -> bool {
                self.$field.failed()
            }

            async fn stop(&mut self) -> ::std::result::Result<(), $crate::ServiceError> {
                self.$field.stop().await
            }
        }
    };
}

#[doc(hidden)]
pub use async_trait::async_trait as __async_trait;

/// Services started in order under one shutdown.
#[derive(Default)]
pub struct Services {
    started: Vec<Box<dyn Service>>,
}

impl Services {
    /// No services yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a started service; it is stopped before every service added earlier.
    pub fn push(&mut self, service: impl Service + 'static) {
        self.started.push(Box::new(service));
    }

    /// Adds a started service, boxed.
    pub fn push_boxed(&mut self, service: Box<dyn Service>) {
        self.started.push(service);
    }

    /// Whether any service failed for good ([`Service::failed`]).
    pub fn any_failed(&self) -> bool {
        self.started.iter().any(|s| s.failed())
    }

    /// The health of every service, in start order.
    pub fn health(&self) -> Vec<(String, Health)> {
        self.started.iter().map(|s| (s.name().to_string(), s.health())).collect()
    }

    /// Stops every service, the last started first, each after the one started after it has
    /// stopped, and reports every service that did not stop cleanly.
    pub async fn stop(mut self) -> Result<(), StopErrors> {
        let mut errors = Vec::new();
        while let Some(mut service) = self.started.pop() {
            tracing::info!(service = service.name(), "stopping");
            if let Err(e) = service.stop().await {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(StopErrors(errors))
        }
    }
}

/// Every service of a [`Services`] that did not stop cleanly.
#[derive(Debug)]
pub struct StopErrors(pub Vec<ServiceError>);

impl fmt::Display for StopErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} service(s) failed:", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for StopErrors {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.first().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("disk on fire")]
    struct Fire;

    #[tokio::test]
    async fn a_failed_task_shows_in_health_at_once_and_in_stop() {
        let mut tasks = Tasks::new("demo", Shutdown::new());
        let shutdown = tasks.shutdown().clone();
        tasks.spawn("steady", async move {
            shutdown.requested().await;
            Ok::<_, Fire>(())
        });
        let (fail, failed) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn("fragile", async move {
            failed.await.ok();
            Err(Fire)
        });
        assert!(tasks.health().healthy);
        let monitor = tasks.monitor();
        fail.send(()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while monitor.health().healthy {
            assert!(tokio::time::Instant::now() < deadline, "the failure never showed");
            tokio::task::yield_now().await;
        }
        assert_eq!(monitor.health().reason.as_deref(), Some("task fragile: disk on fire"));
        let err = tasks.stop().await.unwrap_err();
        assert_eq!(err.to_string(), "demo: fragile: disk on fire");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[tokio::test]
    async fn ending_unasked_and_panicking_are_failures_ending_after_a_stop_is_not() {
        let mut tasks = Tasks::new("demo", Shutdown::new());
        tasks.spawn("quitter", async { Ok::<_, Fire>(()) });
        tasks.spawn("panicker", async {
            panic!("boom");
            #[allow(unreachable_code)]
            Ok::<_, Fire>(())
        });
        tasks.spawn_finite("job", async { Ok::<_, Fire>(()) });
        let err = tasks.join().await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("quitter: ended before it was asked to stop"), "{text}");
        assert!(text.contains("panicker: panicked: boom"), "{text}");
        assert!(!text.contains("job"), "{text}");

        let mut clean = Tasks::new("clean", Shutdown::new());
        let shutdown = clean.shutdown().clone();
        clean.spawn("waits", async move {
            shutdown.requested().await;
            Ok::<_, Fire>(())
        });
        clean.stop().await.unwrap();
        assert_eq!(clean.health().reason.as_deref(), Some("stopped"));
    }

    struct Recorder {
        name: String,
        log: Arc<Mutex<Vec<String>>>,
        fails: bool,
    }

    #[async_trait]
    impl Service for Recorder {
        fn name(&self) -> &str {
            &self.name
        }
        fn health(&self) -> Health {
            Health::ok()
        }
        async fn stop(&mut self) -> Result<(), ServiceError> {
            self.log.lock().unwrap().push(self.name.clone());
            if self.fails {
                Err(ServiceError::new(&self.name, "drain", Fire))
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn services_stop_in_reverse_order_and_every_error_is_reported() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut services = Services::new();
        for (name, fails) in [("store", true), ("views", false), ("nodes", true)] {
            services.push(Recorder { name: name.into(), log: log.clone(), fails });
        }
        let err = services.stop().await.unwrap_err();
        assert_eq!(*log.lock().unwrap(), ["nodes", "views", "store"]);
        assert_eq!(err.0.len(), 2);
        assert_eq!(err.to_string(), "2 service(s) failed:\n  nodes: drain: disk on fire\n  store: drain: disk on fire");
    }

    #[test]
    fn health_combines_reasons_and_details() {
        let h = Health::ok().with("lag", 3).and(Health::failing("stream missing").with("stream", "X"));
        assert!(!h.healthy);
        assert_eq!(h.reason.as_deref(), Some("stream missing"));
        assert_eq!(
            serde_json::to_value(&h).unwrap(),
            serde_json::json!({"healthy": false, "reason": "stream missing", "lag": 3, "stream": "X"})
        );
    }
}
