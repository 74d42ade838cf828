//! `chorus bench …`: runs `chorus-bench`, the benchmark binary, found beside `chorus` (or on
//! `PATH`). It is a binary of its own so that `chorus` does not link the test harness that
//! starts private nats-servers.

use std::path::PathBuf;

/// Arguments of `chorus bench`: everything after `bench` goes to `chorus-bench`.
#[derive(clap::Args)]
#[command(disable_help_flag = true)]
pub struct BenchArgs {
    /// The benchmark and its options, e.g. `backbone --rounds 5`, `replicate`, `--help`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// Replaces this process with `chorus-bench ARGS`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|dir| dir.join("chorus-bench")));
    let program = beside.filter(|p| p.is_file()).unwrap_or_else(|| PathBuf::from("chorus-bench"));
    let error = std::process::Command::new(&program).args(&args.args).exec();
    anyhow::bail!("running {}: {error} (build it with `cargo build --release -p chorus-bench`)", program.display())
}
