//! Enrolment: the provisioner issues a node its credential and pushes its configuration, as
//! Choria's provisioner does with `choria_provision`.
//!
//! For a node in provisioning mode, before the configured steps:
//!
//! 1. `chorus_provision#key` with a fresh nonce: the node answers its public key and its
//!    signature over the identity and the nonce, which is checked here: a credential is only
//!    issued for a key the node proved it holds (a replayed or borrowed answer fails).
//! 2. The *helper*, a command in any language (Choria's `helper`), gets
//!    `{"identity", "public_key", "collective"}` on standard input and answers
//!    `{"configuration": {...}, "action_policies": {"<agent>": "<policy text>"}}`, or
//!    `{"defer": true, "msg": "why"}` to try again later. Without a helper the node gets
//!    the configuration and policies of the provisioner's own configuration.
//! 3. The credential is issued (`CredentialSpec::node`, signed by the provisioner's issuer
//!    key) and sent with the configuration in `chorus_provision#configure`; the node
//!    verifies it against the issuers of its image before storing anything.
//!
//! After the configured steps, `chorus_provision#restart` (when `restart` is set) brings the
//! node back in its normal component.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use chorus_identity::{Credential, CredentialSpec};
use chorus_keys::{KeyConfig, PublicKey, Signer};
use chorus_rpc::agents::provision::{proof_message, AGENT};
use chorus_rpc::{RequestOptions, RpcClient, Target};
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// How nodes are enrolled (the `enrol` section of the provisioner's configuration).
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolConfig {
    /// The issuer key credentials are signed with; nodes trust its public key.
    pub issuer: KeyConfig,
    /// How long an issued credential is valid.
    #[serde(default = "default_validity", with = "humantime_serde")]
    #[schemars(with = "String", extend("default" = "365d"))]
    pub validity: Duration,
    /// The helper that decides each node's configuration: program and arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub helper: Vec<String>,
    /// How long the helper may take.
    #[serde(default = "default_helper_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub helper_timeout: Duration,
    /// Configuration for every node when there is no helper.
    #[serde(default)]
    pub configuration: JsonObject,
    /// Action Policy files for every node when there is no helper, by agent.
    #[serde(default)]
    pub action_policies: BTreeMap<String, String>,
    /// Restart the node into its normal component after the steps.
    #[serde(default = "yes")]
    pub restart: bool,
}

fn default_validity() -> Duration {
    Duration::from_secs(365 * 24 * 3600)
}
fn default_helper_timeout() -> Duration {
    Duration::from_secs(10)
}
fn yes() -> bool {
    true
}

/// The step names enrolment adds around the configured steps.
pub(super) const ENROL_ACTION: &str = "enrol";
/// The final step when `restart` is set.
pub(super) const RESTART_ACTION: &str = "restart";

/// What the helper answers.
#[derive(Debug, Default, Deserialize)]
struct HelperReply {
    #[serde(default)]
    defer: bool,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    configuration: JsonObject,
    #[serde(default)]
    action_policies: BTreeMap<String, String>,
}

/// Enrols nodes with one issuer key.
pub(super) struct Enroller {
    config: EnrolConfig,
    issuer: Arc<dyn Signer>,
}

impl Enroller {
    pub(super) fn open(config: &EnrolConfig) -> Result<Self, String> {
        let issuer = config.issuer.open().map_err(|e| format!("enrol.issuer: {e}"))?;
        Ok(Enroller { config: config.clone(), issuer })
    }

    /// Enrols `identity`: proof of its key, the helper's decision, the credential, configure.
    pub(super) async fn enrol(&self, rpc: &RpcClient, identity: &str, options: &RequestOptions) -> Result<(), String> {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let reply = call(rpc, identity, "key", json!({"nonce": nonce}), options).await?;
        let public_key = reply.get("public_key").and_then(Value::as_str).ok_or("no public_key in the key reply")?;
        let public_key = PublicKey::parse(public_key).map_err(|e| format!("public_key: {e}"))?;
        let proof = reply
            .get("proof")
            .and_then(Value::as_str)
            .and_then(|p| base64::engine::general_purpose::STANDARD.decode(p).ok())
            .ok_or("no proof in the key reply")?;
        if !public_key.verify(&proof_message(identity, &nonce), &proof) {
            return Err("the node did not prove it holds its key".into());
        }
        let decided = match self.config.helper.as_slice() {
            [] => HelperReply {
                configuration: self.config.configuration.clone(),
                action_policies: self.config.action_policies.clone(),
                ..Default::default()
            },
            helper => {
                let input =
                    json!({"identity": identity, "public_key": public_key.to_text(), "collective": rpc.collective()});
                let reply = run_helper(helper, &input, self.config.helper_timeout).await?;
                if reply.defer {
                    return Err(format!("deferred by the helper: {}", reply.msg));
                }
                reply
            }
        };
        let spec = CredentialSpec::node(identity, public_key, self.config.validity);
        let credential = Credential::issue(&*self.issuer, &spec, chrono::Utc::now().timestamp())
            .map_err(|e| format!("issuing the credential: {e}"))?;
        let data = json!({
            "credential": credential.token(),
            "configuration": decided.configuration,
            "action_policies": decided.action_policies,
        });
        call(rpc, identity, "configure", data, options).await.map(drop)
    }
}

async fn call(
    rpc: &RpcClient,
    identity: &str,
    action: &str,
    data: Value,
    options: &RequestOptions,
) -> Result<JsonObject, String> {
    let options = RequestOptions { target: Target::Node(identity.to_owned()), expected: Some(1), ..options.clone() };
    let data = data.as_object().cloned().unwrap_or_default();
    let results = rpc.call(AGENT, action, data, options).await.map_err(|e| format!("{AGENT}#{action}: {e}"))?;
    match results.replies.into_iter().find(|r| r.identity == identity) {
        None => Err(format!("{AGENT}#{action}: no reply")),
        Some(r) if r.statuscode == StatusCode::Ok => Ok(r.data),
        Some(r) if !r.authorized => Err(format!("{AGENT}#{action}: denied: {}", r.statusmsg)),
        Some(r) => Err(format!("{AGENT}#{action}: {}", r.statusmsg)),
    }
}

async fn run_helper(helper: &[String], input: &Value, timeout: Duration) -> Result<HelperReply, String> {
    let program = PathBuf::from(&helper[0]);
    let mut child = tokio::process::Command::new(&program)
        .args(&helper[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("helper {}: {e}", program.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.to_string().as_bytes()).await.map_err(|e| format!("helper input: {e}"))?;
    }
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| format!("helper {} took longer than {timeout:?}", program.display()))?
        .map_err(|e| format!("helper {}: {e}", program.display()))?;
    if !out.status.success() {
        return Err(format!(
            "helper {} failed ({}): {}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("helper {} answered no JSON reply: {e}", program.display()))
}
