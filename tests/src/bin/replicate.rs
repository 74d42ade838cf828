//! Test helper: `chorus replicate --config FILE` as a child process the tests can SIGKILL,
//! through the same library entry point the `chorus` binary calls.
//!
//! Usage: `replicate <config.yaml>`

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let path = std::env::args().nth(1).expect("usage: replicate <config.yaml>");
    if let Err(e) = chorus_replicator::run_until_signal(std::path::Path::new(&path)).await {
        eprintln!("replicate: {e}");
        std::process::exit(1);
    }
}
