//! The conformance suite, run unchanged against the embedded store, a single nats-server and
//! a 3-node JetStream cluster.

use std::sync::Arc;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use chorus_testkit::conformance::{self, CASES};
use chorus_testkit::nats::{NatsCluster, NatsServer};

fn case(name: &str) -> conformance::Case {
    CASES.iter().find(|(n, _)| *n == name).map(|(_, c)| *c).unwrap_or_else(|| panic!("no case {name}"))
}

async fn embedded(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let b: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("store")).unwrap());
    case(name)(b, "CONF".into(), 1).await;
}

async fn single(name: &str) {
    let server = NatsServer::start().unwrap();
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::new([server.url()])).await.unwrap());
    case(name)(b, "CONF".into(), 1).await;
}

macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod embedded_store {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::embedded(stringify!($case)).await } )*
        }
        mod single_nats_server {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::single(stringify!($case)).await } )*
        }
        #[test]
        fn every_case_is_listed() {
            let listed = [$(stringify!($case)),*];
            for (name, _) in CASES {
                assert!(listed.contains(name), "case {name} is not run by this suite");
            }
        }
    };
}

suite!(
    publish_and_read_back,
    dedupe_by_event_id,
    publish_stream_acknowledges_in_order,
    headers_are_kept,
    no_stream_for_subject_is_an_error,
    invalid_messages_are_refused,
    consumer_ack_and_redelivery,
    consumer_nak_redelivers,
    consumer_resumes_by_name,
    consumer_filters_and_start,
    consumer_waits_for_new_messages,
    replay_from_sequence_and_time,
    replay_follows_new_messages,
    retention_limits,
    retention_by_age,
    ensure_stream_never_changes_an_existing_one,
    update_stream_changes_limits_and_subjects,
    concurrent_publishers,
    delete_stream_and_consumer,
    purge_below_a_sequence,
    kv_put_get_create_update_delete,
    kv_history_keys_and_watch,
    kv_values_expire_after_the_ttl,
    kv_create_is_atomic_between_writers,
);

/// The whole suite against one 3-node cluster with R3 streams (one cluster start, many cases).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_runs_the_whole_suite() {
    let cluster = NatsCluster::start(3).unwrap();
    let b: Arc<dyn Backbone> =
        Arc::new(JetStreamBackbone::connect(&NatsConfig::from_url_list(&cluster.url_list())).await.unwrap());
    for (i, (name, run)) in CASES.iter().enumerate() {
        eprintln!("cluster case {name}");
        run(b.clone(), format!("CL{i}"), 3).await;
    }
}
