//! Event rates per stream, from the streams' last sequence sampled every few seconds: no
//! consumer of its own, so watching rates costs the backbone one info call per stream.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_backbone::Backbone;
use chorus_runtime::Shutdown;
use serde::Serialize;

/// How far back a rate looks.
const WINDOW: Duration = Duration::from_secs(60);

/// Rate of one stream, as `/api/rates` returns it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RateSample {
    /// Stream name.
    pub stream: String,
    /// The stream's last sequence at the newest sample (0 before the first).
    pub last_sequence: u64,
    /// Messages the stream held at the newest sample.
    pub messages: u64,
    /// Events per second over the last minute (or since the first sample).
    pub per_second: f64,
}

/// Shared, sampled rates of a set of streams.
#[derive(Clone, Default)]
pub struct StreamRates {
    inner: Arc<Mutex<Vec<Tracked>>>,
}

struct Tracked {
    stream: String,
    messages: u64,
    samples: VecDeque<(Instant, u64)>,
}

impl StreamRates {
    /// Rates of `streams`, none sampled yet.
    pub fn new(streams: Vec<String>) -> Self {
        StreamRates {
            inner: Arc::new(Mutex::new(
                streams.into_iter().map(|stream| Tracked { stream, messages: 0, samples: VecDeque::new() }).collect(),
            )),
        }
    }

    /// Samples the streams of `backbone` every `every` until `shutdown`. A stream that cannot
    /// be read (missing, broker away) keeps its last sample.
    pub async fn sample(&self, backbone: Arc<dyn Backbone>, every: Duration, shutdown: Shutdown) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.requested() => return,
            }
            let names: Vec<String> = self.inner.lock().expect("rates lock").iter().map(|t| t.stream.clone()).collect();
            for name in names {
                let Ok(info) = backbone.stream_info(&name).await else { continue };
                let now = Instant::now();
                let mut all = self.inner.lock().expect("rates lock");
                if let Some(t) = all.iter_mut().find(|t| t.stream == name) {
                    t.messages = info.messages;
                    t.samples.push_back((now, info.last_sequence));
                    while t.samples.len() > 2 && now.duration_since(t.samples[1].0) >= WINDOW {
                        t.samples.pop_front();
                    }
                }
            }
        }
    }

    /// Current rates of every tracked stream.
    pub fn snapshot(&self) -> Vec<RateSample> {
        self.inner
            .lock()
            .expect("rates lock")
            .iter()
            .map(|t| {
                let (per_second, last) = match (t.samples.front(), t.samples.back()) {
                    (Some((t0, s0)), Some((t1, s1))) if t1 > t0 => {
                        ((s1.saturating_sub(*s0)) as f64 / t1.duration_since(*t0).as_secs_f64(), *s1)
                    }
                    (_, Some((_, s1))) => (0.0, *s1),
                    _ => (0.0, 0),
                };
                RateSample { stream: t.stream.clone(), last_sequence: last, messages: t.messages, per_second }
            })
            .collect()
    }
}
