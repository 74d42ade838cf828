//! `chorus completions <shell>` and `chorus man --out DIR`: shell completions and man pages
//! generated from the command line's own definitions, so they cannot drift from it.

use std::path::PathBuf;

use anyhow::Context as _;

/// Arguments of `chorus completions`.
#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for (bash, zsh, fish, elvish, powershell).
    pub shell: clap_complete::Shell,
}

/// Arguments of `chorus man`.
#[derive(clap::Args)]
pub struct ManArgs {
    /// Directory the pages are written into (`chorus.1`, `chorus-rpc.1`, ...), made if
    /// missing; e.g. `/usr/share/man/man1`.
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes the completion script for `args.shell` to stdout.
pub fn completions(args: CompletionsArgs, mut cli: clap::Command) -> anyhow::Result<()> {
    clap_complete::generate(args.shell, &mut cli, "chorus", &mut std::io::stdout());
    Ok(())
}

/// Writes one man page per command and subcommand into `args.out`.
pub fn man(args: ManArgs, cli: clap::Command) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut cli = cli;
    cli.build();
    write_pages(&args.out, &cli, "chorus")?;
    Ok(())
}

/// The page of `command` as `<name>.1`, then its subcommands' as `<name>-<sub>.1`.
fn write_pages(dir: &std::path::Path, command: &clap::Command, name: &str) -> anyhow::Result<()> {
    let page = command.clone().name(name.to_string());
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        write_pages(dir, sub, &format!("{name}-{}", sub.get_name()))?;
    }
    Ok(())
}
