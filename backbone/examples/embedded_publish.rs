//! Profiling aid: publish N events of `size` bytes to an embedded store from P tasks.
//! `cargo run --release -p chorus-backbone --example embedded_publish -- 200000 450 8 2000`

use std::time::Instant;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::{Backbone, Message, StreamConfig};

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (n, size, publishers, batch) = (args[0], args[1], args[2], args[3]);
    let dir = tempfile::tempdir().unwrap();
    let b = EmbeddedBackbone::open_path(dir.path().join("s")).unwrap();
    b.ensure_stream(&StreamConfig::new("P", vec!["p.>".into()])).await.unwrap();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            // Exactly `n` events in all: the first publishers take the remainder.
            let per = n / publishers + usize::from(p < n % publishers);
            for c in 0..per.div_ceil(batch) {
                let msgs: Vec<Message> = (c * batch..per.min((c + 1) * batch))
                    .map(|i| Message::new(format!("{p}-{i}"), "p.e", vec![b'x'; size]))
                    .collect();
                b.publish_batch(msgs).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed();
    println!("{} events/s", (n as f64 / took.as_secs_f64()) as u64);
}
