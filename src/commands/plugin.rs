//! `chorus plugin doc [agent]`: what an agent does, from its description (DDL): every
//! built-in agent, or one of them or a DDL file in detail.

use anyhow::Context as _;
use chorus_rpc::ddl::Ddl;

/// Subcommands of `chorus plugin`.
#[derive(clap::Subcommand)]
pub enum PluginCommand {
    /// List the agents Chorus knows, or describe one: its actions, their inputs (type,
    /// required, default, validation) and outputs.
    Doc {
        /// A built-in agent's name, or a DDL file (`.json`).
        agent: Option<String>,
    },
}

/// Runs a `plugin` subcommand.
pub fn run(command: PluginCommand) -> anyhow::Result<()> {
    let PluginCommand::Doc { agent } = command;
    match agent {
        None => {
            println!("Agents:");
            for name in chorus_rpc::agents::BUILTIN {
                let ddl = chorus_rpc::agents::builtin_ddl(name).expect("built-in agents have a DDL");
                println!("  {:<12} {:<8} {}", name, ddl.metadata.version, ddl.metadata.description);
            }
            Ok(())
        }
        Some(agent) => {
            let loaded;
            let ddl = match chorus_rpc::agents::builtin_ddl(&agent) {
                Some(ddl) => ddl,
                None => {
                    let text = std::fs::read_to_string(&agent)
                        .with_context(|| format!("{agent:?} is neither a built-in agent nor a readable DDL file"))?;
                    loaded = Ddl::parse(&text).map_err(|e| anyhow::anyhow!("{agent}: {e}"))?;
                    &loaded
                }
            };
            print!("{}", describe(ddl));
            Ok(())
        }
    }
}

/// The text `chorus plugin doc AGENT` prints.
fn describe(ddl: &Ddl) -> String {
    use std::fmt::Write as _;
    let m = &ddl.metadata;
    let mut out = String::new();
    let w = &mut out;
    writeln!(w, "{}: {}\n", m.name, m.description).expect("writing to a String cannot fail");
    writeln!(
        w,
        "  Author:  {}\n  Version: {}\n  License: {}\n  Timeout: {}s\n  Home:    {}\n",
        m.author, m.version, m.license, m.timeout, m.url
    )
    .expect("writing to a String cannot fail");
    for action in &ddl.actions {
        writeln!(w, "ACTION: {}\n  {}\n", action.action, action.description).expect("writing to a String cannot fail");
        if action.input.is_empty() {
            writeln!(w, "  Inputs: none").expect("writing to a String cannot fail");
        } else {
            writeln!(w, "  Inputs:").expect("writing to a String cannot fail");
        }
        for (name, input) in &action.input {
            let mut facts =
                vec![input.kind.clone(), if input.optional { "optional".into() } else { "required".into() }];
            if let Some(default) = input.default.as_ref().filter(|d| !d.is_null()) {
                facts.push(format!("default {default}"));
            }
            if let Some(rule) = input.validation.as_deref().filter(|r| !r.is_empty()) {
                facts.push(format!("validation {rule}"));
            }
            if let Some(max) = input.maxlength.filter(|m| *m > 0) {
                facts.push(format!("at most {max} bytes"));
            }
            if let Some(list) = &input.list {
                facts.push(format!("one of {}", list.join(", ")));
            }
            writeln!(w, "    {name} ({}): {}", facts.join(", "), input.description)
                .expect("writing to a String cannot fail");
        }
        writeln!(w, "\n  Outputs:").expect("writing to a String cannot fail");
        for (name, output) in &action.output {
            let kind = output.kind.as_deref().unwrap_or("any");
            writeln!(w, "    {name} ({kind}, shown as {:?}): {}", output.display_as, output.description)
                .expect("writing to a String cannot fail");
        }
        writeln!(w).expect("writing to a String cannot fail");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_builtin_agent_is_documented_from_its_ddl() {
        for name in chorus_rpc::agents::BUILTIN {
            let text = super::describe(chorus_rpc::agents::builtin_ddl(name).unwrap());
            assert!(text.starts_with(&format!("{name}: ")), "{text}");
        }
        let rpcutil = super::describe(chorus_rpc::agents::builtin_ddl("rpcutil").unwrap());
        assert!(rpcutil.contains("ACTION: get_facts"), "{rpcutil}");
        assert!(rpcutil.contains("facts (string, required, validation"), "{rpcutil}");
        let shell = super::describe(chorus_rpc::agents::builtin_ddl("shell").unwrap());
        assert!(shell.contains("timeout_secs (integer, optional, default 60)"), "{shell}");
    }
}
