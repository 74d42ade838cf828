//! `chorus scout`: Choria's Scout commands over the nodes' checks (machines), as requests
//! to the `scout` agent every node runs; targeting and output are `chorus rpc`'s.

use clap::{Args as _, FromArgMatches as _};

use super::rpc::RpcArgs;

/// What to do with the checks.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ScoutAction {
    /// Every check on the nodes, with its state.
    Status,
    /// Run the checks now (FORCE_CHECK).
    Trigger,
    /// Stop the checks (MAINTENANCE).
    Maintenance,
    /// Run the checks again after maintenance (RESUME).
    Resume,
}

/// Arguments of `chorus scout`.
#[derive(clap::Args)]
pub struct ScoutArgs {
    /// What to do.
    action: ScoutAction,
    /// Checks to act on (machine names); every check when none is given.
    #[arg(long = "check", short = 'c')]
    checks: Vec<String>,
    /// `chorus rpc` options: targeting (`-I`, `-F`, `-S`, `--dm`), connection, output, e.g.
    /// `chorus scout trigger -c check_disk -- -I web1.example.net --nats nats://broker:4222`.
    #[arg(last = true)]
    rpc: Vec<String>,
}

/// Sends the request and prints the replies as `chorus rpc` does.
pub async fn run(args: ScoutArgs) -> anyhow::Result<()> {
    let action = match args.action {
        ScoutAction::Status => "checks",
        ScoutAction::Trigger => "trigger",
        ScoutAction::Maintenance => "maintenance",
        ScoutAction::Resume => "resume",
    };
    let mut argv = vec!["chorus scout".to_string(), "scout".into(), action.into()];
    if !matches!(args.action, ScoutAction::Status) {
        argv.push(format!("checks={}", serde_json::to_string(&args.checks)?));
    }
    argv.extend(args.rpc);
    let matches = RpcArgs::augment_args(clap::Command::new("chorus scout")).try_get_matches_from(argv)?;
    super::rpc::run(RpcArgs::from_arg_matches(&matches)?).await
}
