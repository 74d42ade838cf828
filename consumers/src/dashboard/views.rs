//! The inventory projection and the dashboard over a backbone, as one service: what
//! `chorus up` and `chorus dashboard` both run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chorus_backbone::Backbone;
use chorus_runtime::{Health, Observable, Ops, Shutdown, Tasks};
use chorus_schemas::signature::Verifier;

use chorus_platform::{resolve_platform_streams, StreamLimits, StreamMap};
use chorus_schemas::subject::{CHORUS_LIFECYCLE, CHORUS_MACHINE, CHORUS_REGISTRATION};

use super::{Dashboard, StreamRates};
use crate::inventory::{Inventory, StatusPolicy};
use crate::projection::{ProjectionError, ProjectorOptions, Store};

/// How often the dashboard samples the streams' counters for their rates.
const RATES_EVERY: Duration = Duration::from_secs(2);

/// Why the views could not start.
#[derive(Debug, thiserror::Error)]
pub enum ViewsError {
    /// The view store or the projector could not be opened.
    #[error("inventory view: {0}")]
    Projection(#[from] ProjectionError),
    /// The dashboard's address could not be bound.
    #[error("binding the dashboard to {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How the views are started.
#[derive(Clone, Debug)]
pub struct ViewsOptions {
    /// Directory of the view store.
    pub state: std::path::PathBuf,
    /// Where the dashboard listens (port 0 picks one; see [`Views::url`]).
    pub listen: SocketAddr,
    /// Rebuild the inventory from the first event.
    pub rebuild: bool,
    /// When nodes count as missing and expired.
    pub policy: StatusPolicy,
    /// Streams named by the operator for the platform's subjects; the others are found on
    /// the backbone (see [`chorus_platform::resolve_platform_streams`]).
    pub streams: StreamMap,
}

/// The running inventory projection, stream rates and dashboard: a runtime [`Service`].
/// The dashboard's `/healthz` turns 503 with the reason once the projection stops.
pub struct Views {
    url: String,
    inventory: Inventory,
    tasks: Tasks,
    ops: Ops,
}

impl Views {
    /// Opens the view store, starts the projection (verifying signatures with `verifier`
    /// when given) and serves the dashboard, all under `shutdown`.
    pub async fn start(
        backbone: Arc<dyn Backbone>,
        options: &ViewsOptions,
        verifier: Option<Verifier>,
        shutdown: Shutdown,
    ) -> Result<Views, ViewsError> {
        Self::start_with_routes(backbone, options, verifier, |_| axum::Router::new(), shutdown).await
    }

    /// [`Views::start`], serving the routes `routes` makes (given the inventory) beside the
    /// dashboard's: `chorus up` adds its RPC relay and the action page.
    pub async fn start_with_routes(
        backbone: Arc<dyn Backbone>,
        options: &ViewsOptions,
        verifier: Option<Verifier>,
        routes: impl FnOnce(&Inventory) -> axum::Router,
        shutdown: Shutdown,
    ) -> Result<Views, ViewsError> {
        let store = Store::open(&options.state)?;
        let mut projector = Inventory::projector_on(backbone.clone(), &options.streams, &store)?;
        let mut registrations = Inventory::registration_projector_on(backbone.clone(), &options.streams, &store)?;
        let mut watchers = Inventory::watchers_projector_on(backbone.clone(), &options.streams, &store)?;
        if let Some(verifier) = verifier {
            let options = ProjectorOptions { verifier: Some(Arc::new(verifier)), ..Default::default() };
            projector = projector.with_options(options.clone());
            registrations = registrations.with_options(options.clone());
            watchers = watchers.with_options(options);
        }
        if options.rebuild {
            projector.rebuild()?;
            registrations.rebuild()?;
            watchers.rebuild()?;
        }
        let inventory = Inventory::open(&store, options.policy.clone())?.with_progress(projector.progress());
        let registration_progress = registrations.progress();
        let mut tasks = Tasks::new("views", shutdown);
        let stop = tasks.shutdown().clone();
        let (source, overrides) = (&backbone, &options.streams);
        tasks.spawn(
            "inventory projection",
            follow_stream(source.clone(), overrides.clone(), CHORUS_LIFECYCLE, projector, stop.clone()),
        );
        tasks.spawn(
            "registration projection",
            follow_stream(source.clone(), overrides.clone(), CHORUS_REGISTRATION, registrations, stop.clone()),
        );
        tasks.spawn(
            "watcher projection",
            follow_stream(source.clone(), overrides.clone(), CHORUS_MACHINE, watchers, stop),
        );
        let streams = chorus_schemas::subject::streams().iter().map(|(name, _)| name.to_string()).collect();
        let rates = StreamRates::new(streams);
        let sampler = rates.clone();
        let (source, stop) = (backbone.clone(), tasks.shutdown().clone());
        tasks.spawn("stream rates", async move {
            sampler.sample(source, RATES_EVERY, stop).await;
            Ok::<_, ViewsError>(())
        });
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|source| ViewsError::Listen { addr: options.listen, source })?;
        let addr = listener.local_addr().map_err(|source| ViewsError::Listen { addr: options.listen, source })?;
        let dashboard = Dashboard::new(inventory.clone(), rates).with_events(backbone);
        let monitor = Arc::new(ViewsMonitor {
            dashboard: dashboard.clone(),
            registrations: registration_progress,
            tasks: tasks.monitor(),
        });
        let ops = Ops::new().with(monitor);
        let stop = tasks.shutdown().clone();
        let router = dashboard.router().merge(routes(&inventory));
        let serving = ops.clone();
        tasks.spawn("http", async move { serving.serve(listener, router, stop).await });
        Ok(Views { url: format!("http://{addr}/"), inventory, tasks, ops })
    }

    /// What the dashboard's `/metrics` and `/healthz` serve: a process running more services
    /// beside the views (`chorus up`) adds theirs.
    pub fn ops(&self) -> &Ops {
        &self.ops
    }

    /// The dashboard's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The inventory the dashboard reads.
    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }
}

chorus_runtime::service_of_tasks!(Views, tasks);

/// Runs `projector` on the stream that holds `platform`'s subjects, once there is one, until
/// `stop`.
async fn follow_stream<V: crate::projection::View>(
    backbone: Arc<dyn Backbone>,
    overrides: StreamMap,
    platform: &'static str,
    mut projector: crate::projection::Projector<V>,
    stop: Shutdown,
) -> Result<(), ProjectionError> {
    if wait_for_stream(&*backbone, &overrides, platform, &mut projector, &stop).await? {
        projector.run(stop.requested_owned()).await?;
    }
    Ok(())
}

/// Waits until the stream that holds `platform`'s subjects exists, saying why in the
/// projector's progress meanwhile, then points the projector at it. `false`: shut down first.
async fn wait_for_stream<V: crate::projection::View>(
    backbone: &dyn Backbone,
    overrides: &StreamMap,
    platform: &str,
    projector: &mut crate::projection::Projector<V>,
    stop: &Shutdown,
) -> Result<bool, ProjectionError> {
    let mut retry = chorus_runtime::Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(5),
        ..Default::default()
    }
    .retry();
    let progress = projector.progress();
    progress.set_waiting(Some(format!("looking for the stream that holds the {platform} subjects")));
    loop {
        let resolved = match backbone.connected() {
            true => resolve_platform_streams(backbone, &StreamLimits::default(), overrides, false).await,
            false => Err(chorus_platform::PlatformError::Streams("the broker is unreachable".into())),
        };
        let why = match resolved.as_ref().map(|found| found.holding(platform)) {
            Ok(Some(stream)) => {
                progress.set_waiting(None);
                projector.read_from(stream)?;
                return Ok(true);
            }
            Ok(None) => format!("no stream holds the {platform} subjects yet (`chorus streams create` creates it)"),
            Err(e) => format!("cannot list the streams: {e}"),
        };
        if progress.snapshot().waiting.as_deref() != Some(why.as_str()) {
            tracing::warn!(view = %progress.snapshot().view, "{why}; retrying");
            progress.set_waiting(Some(why));
        }
        if !retry.wait(stop).await {
            return Ok(false);
        }
    }
}

/// What the dashboard's `/metrics` and `/healthz` report.
struct ViewsMonitor {
    dashboard: Dashboard,
    registrations: Arc<crate::projection::Progress>,
    tasks: chorus_runtime::TaskMonitor,
}

#[async_trait]
impl Observable for ViewsMonitor {
    fn name(&self) -> &str {
        "views"
    }

    /// Not ready while the lifecycle stream cannot be read (missing, server unreachable):
    /// the inventory would be empty, not true. A missing registration stream (a Choria fleet
    /// without Chorus agents) only leaves inventory discovery without metadata: a detail.
    fn health(&self) -> Health {
        let progress = self.dashboard.inventory().progress();
        let waiting = progress.as_ref().and_then(|p| p.waiting.clone());
        let health =
            self.tasks.health().with("inventory", progress).with("registrations", self.registrations.snapshot());
        match waiting {
            Some(why) => health.and(Health::failing(format!("inventory not ready: {why}"))),
            None => health,
        }
    }

    async fn collect(
        &self,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<(), chorus_runtime::BoxError> {
        self.dashboard.register_metrics(registry).await
    }
}
