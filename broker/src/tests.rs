use std::collections::BTreeMap;

use super::*;

fn user(name: &str, role: Role) -> UserSpec {
    let callerid = (role == Role::Client).then(|| format!("up={name}"));
    UserSpec {
        user: name.into(),
        role,
        password: Some(format!("{name}-pw")),
        password_file: None,
        password_hash: None,
        callerid,
    }
}

fn sample() -> BrokerConfig {
    let mut tenants = BTreeMap::new();
    tenants.insert(
        "acme".to_string(),
        TenantConfig {
            collectives: vec!["acme".into()],
            jetstream: None,
            users: vec![user("acme-agent", Role::Agent), user("acme-admin", Role::Admin)],
            node_buckets: vec!["GOVERNOR_upgrades".into()],
        },
    );
    tenants.insert(
        "globex".to_string(),
        TenantConfig {
            collectives: vec!["globex".into(), "globex_dev".into()],
            jetstream: Some(AccountJetStream { max_file: Some("1GB".into()), ..Default::default() }),
            users: vec![user("globex-client", Role::Client)],
            node_buckets: vec![],
        },
    );
    BrokerConfig {
        server_name: "b1".into(),
        listen: "10.0.0.5:4222".into(),
        monitor: Some("127.0.0.1:8222".into()),
        tls: None,
        jetstream: BrokerJetStream {
            store_dir: "/var/lib/nats".into(),
            max_memory: None,
            max_file: Some("10GB".into()),
        },
        system_account: Some(user("sys", Role::Admin)),
        firewall: Some(FirewallConfig {
            allowed_clients: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
            allowed_monitor: vec!["127.0.0.1".into()],
        }),
        client_networks: None,
        bcrypt_cost: 4,
        tenants,
    }
}

#[test]
fn renders_accounts_users_and_hashes() {
    let conf = sample().render_nats_conf().unwrap();
    assert!(conf.contains("\"acme\": {"), "{conf}");
    assert!(conf.contains("\"globex\": {"), "{conf}");
    assert!(conf.contains("max_file: 1GB"), "{conf}");
    assert!(conf.contains("system_account: \"SYS\""), "{conf}");
    assert!(!conf.contains("acme-agent-pw"), "clear password leaked: {conf}");
    assert!(!conf.contains("exports:") && !conf.contains("imports:"), "{conf}");
    assert!(conf.contains("\"globex.broadcast.agent.>\", \"globex_dev.broadcast.agent.>\""), "{conf}");
    let hashes: Vec<&str> = conf.lines().filter_map(|l| l.trim().strip_prefix("password: \"")).collect();
    assert_eq!(hashes.len(), 3, "{conf}");
    let hash = hashes[0].trim_end_matches('"');
    assert!(is_bcrypt(hash), "{hash}");
    assert!(bcrypt::verify("acme-agent-pw", hash).unwrap());
}

#[test]
fn agent_permissions_are_scoped_to_its_collectives() {
    let p = permissions(Role::Agent, &["acme".into()], None);
    assert!(p.subscribe_allow.contains(&"acme.broadcast.agent.>".to_string()));
    assert!(p.publish_allow.contains(&"chorus.rpc.reply.acme.>".to_string()));
    assert!(!p.publish_allow.iter().any(|s| s == ">" || s == "chorus.audit.>" || s.starts_with("chorus.audit.allow")));
    assert!(p.publish_allow.contains(&"chorus.audit.deny.>".to_string()), "refusals are audited by the node");
    assert!(!p.subscribe_allow.iter().any(|s| s.starts_with("choria.")), "agents do not read others' events");
    let c = permissions(Role::Client, &["acme".into()], Some("up=alice"));
    assert!(
        !c.publish_allow.iter().any(|s| s.starts_with("choria.") || s.starts_with("chorus.")),
        "clients forge no events"
    );
    let private = format!("acme.reply.{}.>", chorus_identity::reply_token("up=alice"));
    assert!(c.subscribe_allow.contains(&private), "{:?}", c.subscribe_allow);
    assert!(!c.subscribe_allow.contains(&"acme.reply.>".to_string()), "no other caller's replies");
    // Agents get the keys of the buckets listed for nodes only, by direct gets.
    assert!(!p.publish_allow.iter().any(|s| s.starts_with("$KV") || s.starts_with("$JS.API.DIRECT")));
    assert_eq!(
        node_buckets(&["GOVERNOR_upgrades".into()]),
        ["$KV.GOVERNOR_upgrades.>", "$JS.API.DIRECT.GET.KV_GOVERNOR_upgrades.$KV.GOVERNOR_upgrades.>"]
    );
    assert!(!permissions(Role::Consumer, &["acme".into()], None)
        .publish_allow
        .iter()
        .any(|s| s.contains("STREAM.CREATE")));
    // A reactor records reactions and calls as its own caller id only.
    let r = permissions(Role::Reactor, &["acme".into()], Some("up=reactor"));
    assert!(
        r.publish_allow.contains(&"chorus.reactor.>".to_string())
            && r.publish_allow.contains(&"acme.node.>".to_string())
    );
    let mine = format!("acme.reply.{}.>", chorus_identity::reply_token("up=reactor"));
    assert!(r.subscribe_allow.contains(&mine) && !r.subscribe_allow.contains(&"acme.reply.>".to_string()));
    let consumer = permissions(Role::Consumer, &["acme".into()], None);
    assert!(!consumer.publish_allow.iter().any(|s| s.starts_with("chorus.reactor") || s.starts_with("acme.")));
    // From outside the client networks, nobody sends requests or reads replies.
    let outside = node_only(Role::Admin, &["acme".into()], None);
    assert!(outside.publish_deny.contains(&"acme.node.>".to_string()));
    assert!(outside.subscribe_deny.contains(&"acme.reply.>".to_string()));
}

#[test]
fn validation_names_the_field() {
    let mut c = sample();
    c.tenants.get_mut("acme").unwrap().users.push(user("globex-client", Role::Client));
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("defined twice"), "{e}");

    let mut c = sample();
    c.tenants.get_mut("acme").unwrap().users[0].password_hash = Some("$2a$04$x".into());
    assert!(c.validate().unwrap_err().to_string().contains("exactly one"));

    let mut c = sample();
    c.tenants.get_mut("globex").unwrap().collectives.push("acme".into());
    assert!(c.validate().unwrap_err().to_string().contains("already a collective"));

    let mut c = sample();
    c.tenants.insert("SYS".into(), c.tenants["acme"].clone());
    assert!(c.validate().unwrap_err().to_string().contains("reserved"));

    let mut c = sample();
    c.firewall.as_mut().unwrap().allowed_clients.push("10.0.0.1/8".into());
    assert!(c.validate().unwrap_err().to_string().contains("beyond"));

    let mut c = sample();
    c.tls = Some(BrokerTls {
        cert_file: "c".into(),
        key_file: "k".into(),
        ca_file: None,
        verify_clients: true,
        timeout: 2.0,
    });
    assert!(c.validate().unwrap_err().to_string().contains("ca_file"));
}

#[test]
fn nftables_allows_only_the_configured_networks() {
    let nft = sample().render_nftables().unwrap().unwrap();
    assert!(nft.contains("tcp dport 4222 ip saddr 10.0.0.0/8 accept"), "{nft}");
    assert!(nft.contains("tcp dport 4222 ip6 saddr 2001:db8::/32 accept"), "{nft}");
    assert!(nft.contains("tcp dport 4222 reject with tcp reset"), "{nft}");
    assert!(nft.contains("tcp dport 8222 ip saddr 127.0.0.1/32 accept"), "{nft}");
    // Accepts come before the reject of the same port.
    let accept = nft.find("dport 4222 ip saddr").unwrap();
    let reject = nft.find("dport 4222 reject").unwrap();
    assert!(accept < reject);
    let mut c = sample();
    c.firewall = None;
    assert!(c.render_nftables().unwrap().is_none());
}

#[test]
fn parses_cidrs() {
    assert_eq!(parse_cidr("10.1.0.0/16").unwrap().1, 16);
    assert_eq!(parse_cidr("192.168.1.7").unwrap().1, 32);
    assert_eq!(parse_cidr("::1").unwrap().1, 128);
    assert!(parse_cidr("10.0.0.0/33").is_err());
    assert!(parse_cidr("nope/8").is_err());
}

#[test]
fn reads_yaml_like_json() {
    let c: BrokerConfig = serde_json::from_value(serde_json::json!({
        "jetstream": {"store_dir": "/d"},
        "tenants": {"t": {"collectives": ["t"], "users": [{"user": "u", "role": "agent", "password_hash": hash_password("x", 4).unwrap()}]}}
    }))
    .unwrap();
    assert_eq!(c.listen, "0.0.0.0:4222");
    c.validate().unwrap();
    assert!(serde_json::from_value::<BrokerConfig>(
        serde_json::json!({"jetstream": {"store_dir": "/d"}, "tenants": {}, "nope": 1})
    )
    .is_err());
}

/// With client networks, the main server moves to the internal port and accepts the edge
/// server's leafnode users; the edge server has the same users with node-only permissions,
/// and the rules send client networks to the main server.
#[test]
fn client_networks_render_an_edge_server_and_redirect_rules() {
    let mut c = sample();
    c.client_networks =
        Some(ClientNetworks { networks: vec!["10.1.0.0/16".into()], internal_port: 4223, leafnode_port: 7422 });
    let rendered = c.render().unwrap();
    assert!(rendered.nats_conf.contains("listen: \"10.0.0.5:4223\""), "{}", rendered.nats_conf);
    assert!(rendered.nats_conf.contains("listen: \"127.0.0.1:7422\""), "{}", rendered.nats_conf);
    assert!(rendered.nats_conf.contains("account: \"acme\""), "{}", rendered.nats_conf);
    let edge = rendered.edge_conf.as_deref().unwrap();
    assert!(edge.contains("listen: \"10.0.0.5:4222\""), "{edge}");
    assert!(!edge.contains("jetstream"), "the edge stores nothing: {edge}");
    assert!(edge.contains("deny: [\"globex.broadcast.>\", \"globex_dev.broadcast.>\""), "{edge}");
    assert!(edge.contains("nats-leaf://leafnode-acme:"), "{edge}");
    let secret = edge.split("nats-leaf://leafnode-acme:").nth(1).unwrap().split('@').next().unwrap();
    assert!(!rendered.nats_conf.contains(secret), "the main server holds only the hash of the leafnode secret");
    let nft = rendered.nftables.unwrap();
    assert!(nft.contains("tcp dport 4222 ip saddr 10.1.0.0/16 redirect to :4223"), "{nft}");
    assert!(nft.contains("tcp dport 4223 reject with tcp reset"), "{nft}");

    c.client_networks.as_mut().unwrap().internal_port = 4222;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("three different ports"), "{e}");
}
