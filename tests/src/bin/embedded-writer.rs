//! Test helper: publishes to an embedded store forever, printing `ACK <id>` for each
//! acknowledged event, so a test can kill it with SIGKILL and check nothing acknowledged is lost.
//!
//! Usage: `embedded-writer <store path> <id prefix>`

use std::io::Write;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::{Backbone, Message, StreamConfig};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("store path");
    let prefix = args.next().expect("id prefix");
    let b = EmbeddedBackbone::open_path(&path).expect("open store");
    b.ensure_stream(&StreamConfig::new("CRASH", vec!["crash.>".into()])).await.expect("stream");
    let mut tasks = Vec::new();
    for w in 0..4 {
        let b = b.clone();
        let prefix = prefix.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let size = 1 + (n % 97) as usize;
                let batch: Vec<Message> = (0..size)
                    .map(|i| Message::new(format!("{prefix}-w{w}-{}", n + i as u64), "crash.event", vec![b'e'; 200]))
                    .collect();
                n += size as u64;
                let ids: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
                b.publish_batch(batch).await.expect("publish");
                let mut out = std::io::stdout().lock();
                for id in ids {
                    writeln!(out, "ACK {id}").unwrap();
                }
                out.flush().unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}
