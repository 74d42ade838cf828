//! The dashboard's action page: run an action on the nodes a filter selects and watch the
//! replies arrive (`GET /rpc`; `POST /api/rpc` starts a request, `GET /api/rpc/{id}?after=N`
//! returns its replies from the N-th on and whether it is done).
//!
//! The page polls rather than reading one long streamed response: polling survives proxies
//! that buffer responses, and a browser that reloads the page can pick the request up by id.
//! A request's replies are kept for [`KEEP_DONE`] after it ends, and at most [`MAX_JOBS`]
//! requests are kept (the oldest finished ones go first).
//!
//! Nodes are found by inventory discovery (the registrations the dashboard already
//! projects), then each is sent the request directly with the filter attached, as
//! `chorus rpc --dm inventory` does. Requests are made and signed as the dashboard's own
//! caller, so what the page can do is what the fleet's Action Policy grants that caller
//! (`chorus up` grants it `rpcutil`, read-only); the listener should be reachable only by
//! those who may act as it.

use std::time::Duration;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chorus_rpc::{discovery_filter, filter_from_parts, CompiledFilter, RequestOptions, RpcClient, Target};
use chorus_schemas::rpc::{Filter, JsonObject};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::inventory::Inventory;

/// What the action page runs requests with.
#[derive(Clone)]
pub struct Actions {
    client: RpcClient,
    inventory: Inventory,
    jobs: Jobs,
}

impl Actions {
    /// Requests made by `client` (its caller id, signer and collective) on nodes found in
    /// `inventory`.
    pub fn new(client: RpcClient, inventory: Inventory) -> Self {
        Actions { client, inventory, jobs: Jobs::default() }
    }

    /// `GET /rpc` (the page), `POST /api/rpc` (start a request) and `GET /api/rpc/{id}`
    /// (its replies so far).
    pub fn router(self) -> Router {
        Router::new()
            .route("/rpc", get(page))
            .route("/api/rpc", post(run))
            .route("/api/rpc/{id}", get(poll))
            .with_state(self)
    }
}

/// The body of `POST /api/rpc`: the action and the filter as `chorus rpc` takes them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    /// Agent to call.
    pub agent: String,
    /// Action to run.
    pub action: String,
    /// Its inputs.
    #[serde(default)]
    pub inputs: JsonObject,
    /// Fact filters (`country=uk`), all must hold.
    #[serde(default)]
    pub facts: Vec<String>,
    /// Classes, exact or `/regex/`, all must hold.
    #[serde(default)]
    pub classes: Vec<String>,
    /// Agents, exact or `/regex/`, all must hold.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Identities, exact or `/regex/`, any may match.
    #[serde(default)]
    pub identities: Vec<String>,
    /// A compound expression.
    #[serde(default)]
    pub compound: Option<String>,
    /// How long to wait for replies, seconds (default 10, at most 300).
    #[serde(default)]
    pub timeout: Option<u64>,
}

impl ActionRequest {
    /// The filter, from the form's lines: blank ones (empty text areas) are no filter.
    fn filter(&self) -> Result<Filter, String> {
        let lines = |v: &[String]| -> Vec<String> {
            v.iter().map(|l| l.trim()).filter(|l| !l.is_empty()).map(String::from).collect()
        };
        let (facts, classes, agents) = (lines(&self.facts), lines(&self.classes), lines(&self.agents));
        let (identities, compound) = (lines(&self.identities), lines(self.compound.as_slice()));
        filter_from_parts(&facts, &classes, &agents, &identities, &compound).map_err(|e| e.to_string())
    }
}

async fn page() -> Html<&'static str> {
    Html(include_str!("rpc.html"))
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// How long a finished request's replies stay readable.
pub const KEEP_DONE: Duration = Duration::from_secs(600);

/// Most requests kept at once.
pub const MAX_JOBS: usize = 64;

/// One request started from the page and what has come back so far.
#[derive(Default)]
struct Job {
    replies: Vec<chorus_schemas::RpcReply>,
    done: Option<Done>,
    finished_at: Option<std::time::Instant>,
}

/// The end of a request: its tally and the nodes that did not answer.
#[derive(Clone, Debug, Serialize)]
struct Done {
    replies: usize,
    ok: usize,
    denied: usize,
    failed: usize,
    no_response: Vec<String>,
}

/// The requests started from the page, by id.
#[derive(Clone, Default)]
pub(super) struct Jobs(Arc<Mutex<HashMap<String, Job>>>);

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes room for one more: forgets requests finished long enough ago, then the oldest
    /// finished ones while there are too many. `false` when every kept request still runs.
    fn make_room(&self) -> bool {
        let mut jobs = self.lock();
        jobs.retain(|_, j| j.finished_at.is_none_or(|t| t.elapsed() < KEEP_DONE));
        while jobs.len() >= MAX_JOBS {
            let oldest =
                jobs.iter().filter_map(|(id, j)| j.finished_at.map(|t| (t, id.clone()))).min().map(|(_, id)| id);
            match oldest {
                Some(id) => jobs.remove(&id),
                None => return false,
            };
        }
        true
    }
}

/// What `POST /api/rpc` answers.
#[derive(Serialize)]
struct Started {
    id: String,
    nodes: usize,
    oldest_registration: Option<chrono::DateTime<chrono::Utc>>,
}

/// What `GET /api/rpc/{id}` answers.
#[derive(Serialize)]
struct Progress {
    replies: Vec<chorus_schemas::RpcReply>,
    received: usize,
    done: Option<Done>,
}

#[derive(Deserialize)]
struct After {
    #[serde(default)]
    after: usize,
}

async fn poll(State(actions): State<Actions>, Path(id): Path<String>, Query(after): Query<After>) -> Response {
    let jobs = actions.jobs.lock();
    match jobs.get(&id) {
        Some(job) => Json(Progress {
            replies: job.replies.iter().skip(after.after).cloned().collect(),
            received: job.replies.len(),
            done: job.done.clone(),
        })
        .into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no request {id} (finished requests are kept for 10 minutes)")),
    }
}

async fn run(State(actions): State<Actions>, Json(request): Json<ActionRequest>) -> Response {
    let filter = match request.filter() {
        Ok(filter) => filter,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let compiled = match CompiledFilter::checked(&discovery_filter(&filter, &request.agent)) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if !actions.jobs.make_room() {
        return error(StatusCode::TOO_MANY_REQUESTS, format!("{MAX_JOBS} requests are running; wait for one to end"));
    }
    let inventory = actions.inventory.clone();
    let collective = actions.client.collective().to_string();
    let found = tokio::task::spawn_blocking(move || inventory.discover(&compiled, &collective, chrono::Utc::now()))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let found = match found {
        Ok(found) if found.nodes.is_empty() => {
            return error(StatusCode::NOT_FOUND, "no registered node matches the filter; nothing was sent".into())
        }
        Ok(found) => found,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let timeout = Duration::from_secs(request.timeout.unwrap_or(10).clamp(1, 300));
    let options = RequestOptions { filter, target: Target::Nodes(found.nodes.clone()), timeout, ..Default::default() };
    let mut stream = match actions.client.request(&request.agent, &request.action, request.inputs, options).await {
        Ok(stream) => stream,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let id = stream.request().requestid.clone();
    actions.jobs.lock().insert(id.clone(), Job::default());
    let (jobs, nodes, job_id) = (actions.jobs.clone(), found.nodes.clone(), id.clone());
    tokio::spawn(async move {
        let mut seen = std::collections::HashSet::new();
        while let Some(reply) = stream.next().await {
            seen.insert(reply.identity.clone());
            if let Some(job) = jobs.lock().get_mut(&job_id) {
                job.replies.push(reply);
            }
        }
        let s = stream.summary();
        let no_response = nodes.into_iter().filter(|n| !seen.contains(n)).collect();
        if let Some(job) = jobs.lock().get_mut(&job_id) {
            job.done = Some(Done { replies: s.replies, ok: s.ok, denied: s.denied, failed: s.failed, no_response });
            job.finished_at = Some(std::time::Instant::now());
        }
    });
    Json(Started { id, nodes: found.nodes.len(), oldest_registration: found.oldest }).into_response()
}
