//! The inventory projection and the dashboard over a backbone, as one service: what
//! `chorus up` and `chorus dashboard` both run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chorus_backbone::Backbone;
use chorus_runtime::{Health, Observable, Ops, Shutdown, Tasks};
use chorus_schemas::signature::Verifier;

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
}

/// The running inventory projection, stream rates and dashboard: a runtime [`Service`].
/// The dashboard's `/healthz` turns 503 with the reason once the projection stops.
pub struct Views {
    url: String,
    inventory: Inventory,
    tasks: Tasks,
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
        let mut projector = Inventory::projector(backbone.clone(), &store)?;
        let mut registrations = Inventory::registration_projector(backbone.clone(), &store)?;
        if let Some(verifier) = verifier {
            let options = ProjectorOptions { verifier: Some(Arc::new(verifier)), ..Default::default() };
            projector = projector.with_options(options.clone());
            registrations = registrations.with_options(options);
        }
        if options.rebuild {
            projector.rebuild()?;
            registrations.rebuild()?;
        }
        let inventory = Inventory::open(&store, options.policy.clone())?.with_progress(projector.progress());
        let mut tasks = Tasks::new("views", shutdown);
        let stop = tasks.shutdown().requested_owned();
        tasks.spawn("inventory projection", async move { projector.run(stop).await.map(|_| ()) });
        let stop = tasks.shutdown().requested_owned();
        tasks.spawn("registration projection", async move { registrations.run(stop).await.map(|_| ()) });
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
        let monitor = Arc::new(ViewsMonitor { dashboard: dashboard.clone(), tasks: tasks.monitor() });
        let ops = Ops::new().with(monitor);
        let stop = tasks.shutdown().clone();
        let router = dashboard.router().merge(routes(&inventory));
        tasks.spawn("http", async move { ops.serve(listener, router, stop).await });
        Ok(Views { url: format!("http://{addr}/"), inventory, tasks })
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

/// What the dashboard's `/metrics` and `/healthz` report.
struct ViewsMonitor {
    dashboard: Dashboard,
    tasks: chorus_runtime::TaskMonitor,
}

#[async_trait]
impl Observable for ViewsMonitor {
    fn name(&self) -> &str {
        "views"
    }

    fn health(&self) -> Health {
        let progress = self.dashboard.inventory().progress();
        self.tasks.health().with("inventory", progress)
    }

    async fn collect(
        &self,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<(), chorus_runtime::BoxError> {
        self.dashboard.register_metrics(registry).await
    }
}
