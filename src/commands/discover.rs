//! `chorus discover` (which nodes a filter selects) and `chorus facts` (the values of one
//! fact across them), as Choria's commands of the same names.

use std::collections::BTreeMap;

use chorus_rpc::{RequestOptions, Target};
use futures::StreamExt;

use super::rpc::ClientArgs;
use super::targeting::{Method, TargetArgs};

/// Arguments of `chorus discover`.
#[derive(clap::Args)]
pub struct DiscoverArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    target: TargetArgs,
    /// Print a JSON list of identities (a nodes file for `--nodes`).
    #[arg(long)]
    json: bool,
}

/// Prints the nodes the filter selects, by the discovery method in effect (broadcast when
/// none is given).
pub async fn discover(mut args: DiscoverArgs) -> anyhow::Result<()> {
    args.target.inventory_from(&args.client);
    let rpc = args.client.connect(&args.target.collective).await?;
    let nodes = find(&args.target, &rpc).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
    } else {
        for node in &nodes {
            println!("{node}");
        }
        println!("\nDiscovered {} nodes", nodes.len());
    }
    Ok(())
}

/// The nodes `target` selects among those with `rpcutil` (every Chorus and Choria node).
async fn find(target: &TargetArgs, rpc: &chorus_rpc::RpcClient) -> anyhow::Result<Vec<String>> {
    let filter = chorus_rpc::discovery_filter(&target.filter()?, "rpcutil");
    let method = match target.method() {
        Some(method) => method,
        // Exact identities alone name the nodes (Choria's shortcut, no traffic); absent
        // ones show up as not responding to the request that follows.
        None if !target.exact_identities().is_empty() => return Ok(target.exact_identities()),
        None => Method::Broadcast,
    };
    let found = target.discover(method, rpc, &filter).await?;
    for note in &found.notes {
        eprintln!("{note}");
    }
    Ok(found.nodes)
}

/// Arguments of `chorus facts`.
#[derive(clap::Args)]
pub struct FactsArgs {
    /// The fact, a dotted path (`os.family`).
    fact: String,
    #[command(flatten)]
    client: ClientArgs,
    #[command(flatten)]
    target: TargetArgs,
    /// List the nodes with each value.
    #[arg(short = 'n', long)]
    show_nodes: bool,
    /// Most frequent value first.
    #[arg(short = 'r', long)]
    reverse: bool,
    /// Print `{value: [nodes]}` as JSON.
    #[arg(long)]
    json: bool,
    /// How long to wait for the nodes' answers.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

/// Asks the discovered nodes for one fact (`rpcutil get_fact`) and prints each value with
/// how many nodes have it, least common first.
pub async fn facts(mut args: FactsArgs) -> anyhow::Result<()> {
    args.target.inventory_from(&args.client);
    let rpc = args.client.connect(&args.target.collective).await?;
    let nodes = find(&args.target, &rpc).await?;
    anyhow::ensure!(!nodes.is_empty(), "did not discover any nodes");
    let mut data = serde_json::Map::new();
    data.insert("fact".into(), args.fact.clone().into());
    let options = RequestOptions {
        filter: args.target.filter()?,
        target: Target::Nodes(nodes.clone()),
        timeout: args.timeout,
        ..Default::default()
    };
    let mut stream = rpc.request("rpcutil", "get_fact", data, options).await?;
    let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let (mut ok, mut failed) = (0, 0);
    while let Some(reply) = stream.next().await {
        if reply.statuscode as u8 != 0 {
            eprintln!("{}: {}", reply.identity, reply.statusmsg);
            failed += 1;
            continue;
        }
        ok += 1;
        let value = match reply.data.get("value") {
            None | Some(serde_json::Value::Null) => "nil".to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        values.entry(value).or_default().push(reply.identity);
    }
    anyhow::ensure!(ok > 0, "no node answered with the fact {}", args.fact);
    for list in values.values_mut() {
        list.sort();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&values)?);
        return Ok(());
    }
    let mut rows: Vec<(&String, &Vec<String>)> = values.iter().collect();
    rows.sort_by(|a, b| a.1.len().cmp(&b.1.len()).then(a.0.cmp(b.0)));
    if args.reverse {
        rows.reverse();
    }
    println!("Report for fact: {}\n", args.fact);
    let width = rows.iter().map(|(v, _)| v.chars().count()).max().unwrap_or(0);
    for (value, holders) in rows {
        println!("  {value:<width$}  found {} times", holders.len());
        if args.show_nodes {
            for node in holders {
                println!("      {node}");
            }
            println!();
        }
    }
    if failed > 0 {
        println!("\n{failed} of {} discovered nodes answered with an error (above)", nodes.len());
    }
    let silent = nodes.len() - ok - failed;
    if silent > 0 {
        println!("\n{silent} of {} discovered nodes did not answer", nodes.len());
    }
    Ok(())
}
