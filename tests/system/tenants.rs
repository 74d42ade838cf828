//! A real nats-server running what `chorus broker config` generates for some tenants, and
//! connection settings for their users. Every test user's password is `<user>-pw`.

use std::path::Path;
use std::time::Duration;

use chorus_backbone::jetstream::{NatsAuth, NatsConfig};
use chorus_broker::BrokerConfig;
use chorus_testkit::nats::NatsServer;

/// A broker whose `tenants:` section is `tenants` (YAML, indented by two spaces), its
/// JetStream in `store`.
pub fn broker(store: &Path, tenants: &str) -> NatsServer {
    let config: BrokerConfig = serde_yaml::from_str(&format!(
        "jetstream: {{store_dir: {}}}\nbcrypt_cost: 4\ntenants:\n{tenants}",
        store.display()
    ))
    .unwrap();
    config.validate().unwrap();
    NatsServer::builder().base_config(&config.render_nats_conf().unwrap()).start().unwrap()
}

/// Connection settings of broker user `user`.
pub fn as_user(server: &NatsServer, user: &str) -> NatsConfig {
    let mut c = NatsConfig::new([server.url()]);
    c.auth = NatsAuth::UserPassword { user: user.into(), password: format!("{user}-pw") };
    c.request_timeout = Duration::from_secs(5);
    c.publish_retry_for = Duration::from_secs(5);
    c
}
