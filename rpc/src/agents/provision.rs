//! `chorus_provision`: the node side of enrolment, as Choria's `choria_provision` agent is
//! for its provisioner.
//!
//! A node in provisioning mode answers three actions:
//!
//! * `key` (`nonce`): the node's public key and a *proof of possession*, the node's
//!   signature over [`proof_message`] of its identity and the provisioner's nonce. The
//!   provisioner issues a credential only for a key the node proved it holds.
//! * `configure` (`credential`, `configuration`, `action_policies`): the node verifies the
//!   credential itself (issued by an issuer it trusts from its image, for its identity and
//!   its key) before it stores anything, then stores the credential, its configuration and its
//!   Action Policy files for its next start.
//! * `restart` (`splay`): after answering, the node restarts into its normal component.
//!
//! Where keys are kept, what "store" and "restart" mean, is the node's business
//! ([`Enrollee`]): the agent on a real node writes files and restarts its process, the
//! simulator keeps it in memory and starts its node again as `server`.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use chorus_identity::{Issuers, Role};
use chorus_keys::Signer;
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::StatusCode;
use serde_json::{json, Value};

use super::{ActionContext, ActionReply, Agent};

/// The agent's name.
pub const AGENT: &str = "chorus_provision";

/// What a node stores when it is configured.
#[derive(Clone, Debug, PartialEq)]
pub struct Enrolment {
    /// The node credential, verified.
    pub credential: String,
    /// Configuration the provisioner's helper decided (merged over the node's).
    pub configuration: JsonObject,
    /// Action Policy files by agent name (`<agent>.policy`).
    pub action_policies: BTreeMap<String, String>,
}

/// The node side of enrolment, per node: its key, whom it trusts, how it stores and restarts.
#[async_trait]
pub trait Enrollee: Send + Sync {
    /// The key of node `identity` (made when it has none).
    fn key(&self, identity: &str) -> Result<Arc<dyn Signer>, String>;
    /// The issuers whose credentials the node accepts (from its image, not the request).
    fn issuers(&self) -> &Issuers;
    /// Stores what enrolment gave the node, for its next start.
    async fn apply(&self, identity: &str, enrolment: Enrolment) -> Result<(), String>;
    /// Restarts the node into its normal component (after the reply went out).
    async fn restart(&self, identity: &str) -> Result<(), String>;
}

/// An agent name a policy file may be named after (`<agent>.policy`): no path in it.
fn valid_agent_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The message a node signs to prove it holds its key.
pub fn proof_message(identity: &str, nonce: &str) -> Vec<u8> {
    format!("chorus.enrol\n{identity}\n{nonce}").into_bytes()
}

/// The `chorus_provision` agent.
pub struct Provision {
    enrollee: Arc<dyn Enrollee>,
}

impl Provision {
    /// The agent over a node's (or a simulator's nodes') enrolment.
    pub fn new(enrollee: Arc<dyn Enrollee>) -> Self {
        Provision { enrollee }
    }
}

fn text<'a>(data: &'a JsonObject, name: &str) -> Result<&'a str, ActionReply> {
    match data.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(ActionReply::error(StatusCode::InvalidData, format!("{name} must be a non-empty string"))),
    }
}

impl Provision {
    fn key(&self, identity: &str, data: &JsonObject) -> Result<ActionReply, ActionReply> {
        let nonce = text(data, "nonce")?;
        if nonce.len() < 16 {
            return Err(ActionReply::error(StatusCode::InvalidData, "nonce must be at least 16 characters"));
        }
        let key = self.enrollee.key(identity).map_err(|e| ActionReply::error(StatusCode::Aborted, e))?;
        let proof = key
            .sign(&proof_message(identity, nonce))
            .map_err(|e| ActionReply::error(StatusCode::Aborted, format!("signing the proof: {e}")))?;
        let data = json!({
            "identity": identity,
            "public_key": key.public_key().to_text(),
            "proof": base64::engine::general_purpose::STANDARD.encode(proof),
        });
        Ok(ActionReply::ok(data.as_object().cloned().unwrap_or_default()))
    }

    async fn configure(&self, identity: &str, data: &JsonObject) -> Result<ActionReply, ActionReply> {
        let token = text(data, "credential")?;
        let now = chrono::Utc::now().timestamp();
        let credential = self
            .enrollee
            .issuers()
            .verify(token, Role::Node, now)
            .map_err(|e| ActionReply::error(StatusCode::Aborted, format!("credential refused: {e}")))?;
        let claims = credential.claims();
        if claims.sub != identity {
            return Err(ActionReply::error(
                StatusCode::Aborted,
                format!("credential refused: it is for {:?}, not this node", claims.sub),
            ));
        }
        let key = self.enrollee.key(identity).map_err(|e| ActionReply::error(StatusCode::Aborted, e))?;
        if &claims.public_key != key.public_key() {
            return Err(ActionReply::error(StatusCode::Aborted, "credential refused: it binds another key"));
        }
        let configuration = match data.get("configuration") {
            None | Some(Value::Null) => JsonObject::new(),
            Some(Value::Object(o)) => o.clone(),
            Some(_) => return Err(ActionReply::error(StatusCode::InvalidData, "configuration must be an object")),
        };
        let action_policies = match data.get("action_policies") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(o)) => o
                .iter()
                .map(|(agent, text)| match text {
                    Value::String(t) if valid_agent_name(agent) => Ok((agent.clone(), t.clone())),
                    _ => Err(ActionReply::error(
                        StatusCode::InvalidData,
                        format!("action_policies.{agent}: an agent name and the policy text"),
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(ActionReply::error(StatusCode::InvalidData, "action_policies must be an object")),
        };
        let enrolment = Enrolment { credential: token.to_owned(), configuration, action_policies };
        self.enrollee.apply(identity, enrolment).await.map_err(|e| ActionReply::error(StatusCode::Aborted, e))?;
        let data = json!({"configured": true, "expires": claims.exp});
        Ok(ActionReply::ok(data.as_object().cloned().unwrap_or_default()))
    }

    fn restart(&self, identity: &str, data: &JsonObject) -> ActionReply {
        let splay = data.get("splay").and_then(Value::as_u64).unwrap_or(0).min(600);
        let (enrollee, identity) = (self.enrollee.clone(), identity.to_owned());
        tokio::spawn(async move {
            // After the reply: the provisioner learns the restart was accepted.
            tokio::time::sleep(std::time::Duration::from_millis(100 + splay * 1000)).await;
            if let Err(e) = enrollee.restart(&identity).await {
                tracing::error!(%identity, error = %e, "provision: restarting into the normal component failed");
            }
        });
        let data = json!({"message": format!("restarting in {splay}s")});
        ActionReply::ok(data.as_object().cloned().unwrap_or_default())
    }
}

#[async_trait]
impl Agent for Provision {
    fn name(&self) -> &str {
        AGENT
    }

    fn actions(&self) -> Vec<String> {
        vec!["configure".into(), "key".into(), "restart".into()]
    }

    async fn handle(&self, action: &str, data: &JsonObject, ctx: &ActionContext<'_>) -> ActionReply {
        let identity = ctx.node.identity.as_str();
        if !ctx.node.provision_mode {
            return ActionReply::error(StatusCode::Aborted, "this node is not in provisioning mode");
        }
        let result = match action {
            "key" => self.key(identity, data),
            "configure" => self.configure(identity, data).await,
            "restart" => Ok(self.restart(identity, data)),
            other => Err(ActionReply::error(StatusCode::UnknownAction, format!("unknown action {other}"))),
        };
        result.unwrap_or_else(|e| e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_identity::{Credential, CredentialSpec};
    use chorus_keys::{Algorithm, FileSigner};
    use std::sync::Mutex;

    struct Node {
        key: Arc<dyn Signer>,
        issuers: Issuers,
        applied: Mutex<Vec<Enrolment>>,
    }

    #[async_trait]
    impl Enrollee for Node {
        fn key(&self, _: &str) -> Result<Arc<dyn Signer>, String> {
            Ok(self.key.clone())
        }
        fn issuers(&self) -> &Issuers {
            &self.issuers
        }
        async fn apply(&self, _: &str, enrolment: Enrolment) -> Result<(), String> {
            self.applied.lock().unwrap().push(enrolment);
            Ok(())
        }
        async fn restart(&self, _: &str) -> Result<(), String> {
            Ok(())
        }
    }

    async fn run(agent: &Provision, action: &str, data: Value, provision_mode: bool) -> ActionReply {
        let mut node = crate::NodeContext::new("n1", "choria");
        node.provision_mode = provision_mode;
        let data = data.as_object().cloned().unwrap_or_default();
        super::super::handle_as(agent, &node, "choria=provisioner", action, &data).await
    }

    /// The node proves its key, and refuses every credential but one from its issuer, for
    /// itself and its key; nothing is stored until one is right.
    #[tokio::test]
    async fn a_node_proves_its_key_and_verifies_its_credential() {
        let issuer = FileSigner::random(Algorithm::Ed25519);
        let rogue = FileSigner::random(Algorithm::Ed25519);
        let mut issuers = Issuers::new();
        issuers.trust(issuer.public_key().clone());
        let key: Arc<dyn Signer> = Arc::new(FileSigner::random(Algorithm::Ed25519));
        let node = Arc::new(Node { key: key.clone(), issuers, applied: Mutex::default() });
        let agent = Provision::new(node.clone());

        let reply = run(&agent, "key", json!({"nonce": "0123456789abcdef"}), true).await;
        assert_eq!(reply.status, StatusCode::Ok, "{reply:?}");
        let proof = base64::engine::general_purpose::STANDARD.decode(reply.data["proof"].as_str().unwrap()).unwrap();
        assert!(key.public_key().verify(&proof_message("n1", "0123456789abcdef"), &proof));
        assert_eq!(reply.data["public_key"], key.public_key().to_text());

        let issue = |by: &FileSigner, subject: &str, public: &chorus_keys::PublicKey| {
            let spec = CredentialSpec::node(subject, public.clone(), std::time::Duration::from_secs(3600));
            Credential::issue(by, &spec, chrono::Utc::now().timestamp()).unwrap().token().to_string()
        };
        let other_key = FileSigner::random(Algorithm::Ed25519);
        for (token, why) in [
            (issue(&rogue, "n1", key.public_key()), "credential refused"),
            (issue(&issuer, "n2", key.public_key()), "not this node"),
            (issue(&issuer, "n1", other_key.public_key()), "binds another key"),
        ] {
            let reply = run(&agent, "configure", json!({"credential": token}), true).await;
            assert_eq!(reply.status, StatusCode::Aborted);
            assert!(reply.message.contains(why), "{}", reply.message);
        }
        assert!(node.applied.lock().unwrap().is_empty(), "nothing stored from a refused credential");

        let good = issue(&issuer, "n1", key.public_key());
        let data = json!({"credential": good, "configuration": {"a": 1}, "action_policies": {"rpcutil": "policy default allow\n"}});
        let reply = run(&agent, "configure", data.clone(), false).await;
        assert_eq!(reply.status, StatusCode::Aborted, "only in provisioning mode");
        let reply = run(&agent, "configure", data, true).await;
        assert_eq!(reply.status, StatusCode::Ok, "{reply:?}");
        let applied = node.applied.lock().unwrap().clone();
        assert_eq!(applied.len(), 1);
        assert_eq!(applied[0].configuration["a"], 1);
        let bad = json!({"credential": issue(&issuer, "n1", key.public_key()), "action_policies": {"../x": "p"}});
        assert_eq!(
            run(&agent, "configure", bad, true).await.status,
            StatusCode::InvalidData,
            "no path in a policy name"
        );
    }
}
