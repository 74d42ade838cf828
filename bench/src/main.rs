//! `chorus-bench` (also run as `chorus bench …`): measurements that compare Chorus with the
//! raw tools under it, measured in the same run on the same server so the ratios mean
//! something on any machine. A binary of its own: it links the test harness, which starts
//! private nats-servers, and `chorus` does not.

mod backbone;
mod fanin;
mod react;
mod replicate;
mod rpc;
mod simulate;
mod views;

use std::time::Duration;

use clap::{Parser, Subcommand};

/// Chorus measured against raw async-nats and nats-server, in one run on this machine.
#[derive(Parser)]
#[command(name = "chorus bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Publish and consume rates: Chorus on JetStream vs raw async-nats, and the embedded store.
    Backbone(backbone::Args),
    /// Simulated nodes in one process: startup storm stored, memory per node, events/s.
    Simulate(simulate::Args),
    /// Reactor rule evaluation rate vs raw consume of the same lifecycle stream.
    React(react::Args),
    /// Site → hub copy rate and lag: the replicator vs a native JetStream mirror and a naive copier.
    Replicate(replicate::Args),
    /// RPC round trip to many nodes: unsigned vs signed requests and replies, vs raw async-nats.
    Rpc(rpc::Args),
    /// Inventory projection rate vs raw consume of the same lifecycle stream, and from the embedded store.
    Views(views::Args),
}

/// mimalloc rather than glibc's allocator: profiles of `chorus bench rpc` spent about 40% of
/// the CPU of a reply in malloc and free (many small strings and JSON values per reply).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    chorus_runtime::logging::init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(cli.command))
}

async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Backbone(args) => backbone::run(args).await,
        BenchCommand::Simulate(args) => simulate::run(args).await,
        BenchCommand::React(args) => react::run(args).await,
        BenchCommand::Replicate(args) => replicate::run(args).await,
        BenchCommand::Views(args) => views::run(args).await,
        BenchCommand::Rpc(args) => rpc::run(args).await,
    }
}

/// Options of the benchmarks that compare on JetStream and then measure the embedded store.
#[derive(clap::Args)]
pub struct CommonArgs {
    /// Use this NATS server instead of starting a private nats-server.
    #[arg(long)]
    nats: Option<String>,
    /// Interleaved rounds of the JetStream measurements; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Skip the embedded store.
    #[arg(long)]
    no_embedded: bool,
}

/// The median of measurements of interleaved rounds (the upper one of an even count).
pub fn median<T: Ord + Copy>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

/// CPU time (user + system) this process has used so far: the difference over a measured run
/// divided by its events is the CPU per event.
pub fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat` (clock
/// ticks, so 10 ms resolution: measure runs of a second or more).
pub fn pid_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / per_second)
}

/// The CPU time of this process and of each measured server, taken together so the
/// difference of two readings over a run is what each spent on it.
#[derive(Clone)]
pub struct CpuMeter {
    servers: Vec<(String, u32)>,
}

/// One reading of a [`CpuMeter`]: this process first, then each server in order, by name.
#[derive(Clone, Debug, Default)]
pub struct CpuReading(Vec<(String, Duration)>);

/// One measured run: its wall time (as the run measured it) and the CPU each process spent
/// meanwhile.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Wall time of the run.
    pub took: Duration,
    /// CPU of this process and each metered server over the run.
    pub cpu: CpuReading,
}

/// The median of each copier's rounds by `took` (the upper one of an even count).
pub fn median_runs<T>(runs: &[Vec<T>], took: impl Fn(&T) -> Duration) -> Vec<&T> {
    runs.iter()
        .map(|r| {
            let mut sorted: Vec<&T> = r.iter().collect();
            sorted.sort_by_key(|r| took(r));
            sorted[sorted.len() / 2]
        })
        .collect()
}

/// The median of interleaved rounds by wall time, with that round's CPU.
pub fn median_sample(mut v: Vec<Sample>) -> Sample {
    v.sort_by_key(|s| s.took);
    v.swap_remove(v.len() / 2)
}

impl CpuMeter {
    /// Meters this process and the named server processes.
    pub fn new(servers: Vec<(String, u32)>) -> Self {
        CpuMeter { servers }
    }

    /// Meters this process and the private server of a run, if it started one (a server
    /// given with `--nats` is not on this machine's process table for certain).
    pub fn with_server(server: Option<&chorus_testkit::nats::NatsServer>) -> Self {
        CpuMeter::new(
            server.and_then(|s| s.pid()).map(|pid| vec![("nats-server".to_string(), pid)]).unwrap_or_default(),
        )
    }

    /// Reads every process's CPU time now.
    pub fn read(&self) -> CpuReading {
        CpuReading(
            std::iter::once(("client".to_string(), process_cpu()))
                .chain(self.servers.iter().map(|(name, pid)| (name.clone(), pid_cpu(*pid))))
                .collect(),
        )
    }

    /// Column headers: the client, then each server.
    pub fn names(&self) -> Vec<String> {
        std::iter::once("client".to_string()).chain(self.servers.iter().map(|(n, _)| n.clone())).collect()
    }

    /// Runs `run` (which returns its own wall time) and the CPU each process spent on it.
    pub async fn sample<F>(&self, run: F) -> anyhow::Result<Sample>
    where
        F: std::future::Future<Output = anyhow::Result<Duration>>,
    {
        let before = self.read();
        let took = run.await?;
        Ok(Sample { took, cpu: self.read().since(&before) })
    }
}

impl CpuReading {
    /// CPU spent by each process between `earlier` and this reading.
    pub fn since(&self, earlier: &CpuReading) -> CpuReading {
        CpuReading(self.0.iter().zip(&earlier.0).map(|((n, a), (_, b))| (n.clone(), a.saturating_sub(*b))).collect())
    }

    /// Microseconds of CPU per event, per process.
    pub fn per_event(&self, events: usize) -> Vec<f64> {
        self.0.iter().map(|(_, d)| d.as_secs_f64() * 1e6 / events.max(1) as f64).collect()
    }

    /// The processes read, in order.
    pub fn names(&self) -> Vec<String> {
        self.0.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// Events per second.
pub fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64().max(1e-9)
}

/// A row of a result table: what was measured, events/s, and the ratio to its baseline.
pub struct Row {
    /// What was measured, as shown in the table.
    pub name: String,
    /// Events processed in the measured run.
    pub events: usize,
    /// Wall time of the run (the median of the rounds where there are several).
    pub took: Duration,
    /// Rate (events/s) this row is compared with; `None` for a baseline row itself.
    pub baseline: Option<f64>,
    /// CPU of this process and of each metered server over the run, where measured.
    pub cpu: Option<CpuReading>,
}

impl Row {
    /// A row of a measured run.
    pub fn of(name: impl Into<String>, events: usize, sample: Sample, baseline: Option<f64>) -> Self {
        Row { name: name.into(), events, took: sample.took, baseline, cpu: Some(sample.cpu) }
    }

    /// Events per second.
    pub fn rate(&self) -> f64 {
        rate(self.events, self.took)
    }
}

/// Prints rows as a Markdown table (pasted as-is into docs/BENCHMARKS.md), with the CPU
/// per event of this process and of each metered server where the rows measured it.
pub fn print_table(title: &str, rows: &[Row]) {
    let names = rows.iter().find_map(|r| r.cpu.as_ref()).map(CpuReading::names).unwrap_or_default();
    let cpu_heads: String = names.iter().map(|n| format!(" {n} µs CPU/event |")).collect();
    println!("\n### {title}\n");
    println!("| measurement | events | seconds | events/s | ratio |{cpu_heads}");
    println!("|---|---:|---:|---:|---:|{}", "---:|".repeat(names.len()));
    for r in rows {
        let ratio = r.baseline.map(|b| format!("{:.2}", r.rate() / b)).unwrap_or_else(|| "baseline".into());
        let cpu: String = match &r.cpu {
            Some(c) => c.per_event(r.events).iter().map(|v| format!(" {v:.1} |")).collect(),
            None => " - |".repeat(names.len()),
        };
        println!("| {} | {} | {:.3} | {:.0} | {} |{cpu}", r.name, r.events, r.took.as_secs_f64(), r.rate(), ratio);
    }
}

/// The NATS URL to measure against: `given`, or a private nats-server started for this run
/// (kept alive by the returned guard).
pub fn nats_url(given: Option<&str>) -> anyhow::Result<(Option<chorus_testkit::nats::NatsServer>, String)> {
    use anyhow::Context as _;
    Ok(match given {
        Some(u) => (None, u.to_string()),
        None => {
            let s = chorus_testkit::nats::NatsServer::start().context("starting nats-server")?;
            let url = s.url();
            (Some(s), url)
        }
    })
}

/// The raw async-nats baseline: creates `stream` on `subject.>` and publishes `events` on
/// `subject.event` with `Nats-Msg-Id`, `window` acknowledgements in flight, as Chorus does.
pub async fn raw_publish(
    js: &async_nats::jetstream::Context,
    stream: &str,
    subject: &str,
    events: &[(String, bytes::Bytes)],
    window: usize,
) -> anyhow::Result<Duration> {
    use async_nats::jetstream;
    js.create_stream(jetstream::stream::Config {
        name: stream.into(),
        subjects: vec![format!("{subject}.>")],
        ..Default::default()
    })
    .await?;
    raw_publish_into(js, &format!("{subject}.event"), events, window).await
}

/// [`raw_publish`] into a stream that already captures `target`.
pub async fn raw_publish_into(
    js: &async_nats::jetstream::Context,
    target: &str,
    events: &[(String, bytes::Bytes)],
    window: usize,
) -> anyhow::Result<Duration> {
    use async_nats::jetstream::{self, message::PublishMessage};
    let target = target.to_string();
    let started = std::time::Instant::now();
    let mut inflight = std::collections::VecDeque::with_capacity(window);
    for (id, payload) in events {
        if inflight.len() >= window {
            let f: jetstream::context::PublishAckFuture = inflight.pop_front().unwrap();
            f.await?;
        }
        inflight.push_back(
            js.send_publish(target.clone(), PublishMessage::build().message_id(id).payload(payload.clone())).await?,
        );
    }
    for f in inflight {
        f.await?;
    }
    Ok(started.elapsed())
}
