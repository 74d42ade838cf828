//! `package`: Choria's package agent (`status`, `install`, `update`, `uninstall`, `purge`,
//! `refresh`, `search`, `count`, `md5`, `checkupdates`, `yum_clean`) with its DDL's inputs
//! and outputs, driving apt (`apt-get`, `apt-cache`, `dpkg-query`) or dnf (`dnf`, `rpm`),
//! whichever is on `PATH`.
//!
//! Answers as Choria's: installing an installed package without a version, or updating or
//! removing an absent one, fails with the package's properties in the reply. Package names
//! and versions go to the package manager as arguments of their own, never through a
//! shell (and the DDL refuses shell metacharacters before that). One package command at a
//! time per process.

use std::time::Duration;

use async_trait::async_trait;
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::StatusCode;
use serde_json::{json, Value};

use super::{process, string_input, ActionContext, ActionReply, Agent};

/// How long one package-manager command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(170);

static PACKAGE_MANAGER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The `package` agent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Package;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Manager {
    Apt,
    Dnf,
}

impl Manager {
    /// apt when `apt-get` is on `PATH`, else dnf when `dnf` is.
    fn find() -> Option<Manager> {
        let on_path = |name: &str| {
            std::env::var_os("PATH")
                .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
        };
        if on_path("apt-get") {
            Some(Manager::Apt)
        } else if on_path("dnf") {
            Some(Manager::Dnf)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Manager::Apt => "apt",
            Manager::Dnf => "dnf",
        }
    }

    /// The command for `action` on `package` (at `version`, for install).
    fn command(self, action: &str, package: &str, version: Option<&str>) -> (&'static str, Vec<String>) {
        let pkg = package.to_string();
        match (self, action) {
            (Manager::Apt, "install") => {
                let target = version.map_or(pkg, |v| format!("{package}={v}"));
                (
                    "apt-get",
                    vec![
                        "install".into(),
                        "-y".into(),
                        "-q".into(),
                        "-o".into(),
                        "DPkg::Options::=--force-confold".into(),
                        target,
                    ],
                )
            }
            (Manager::Apt, "update") => {
                ("apt-get", vec!["install".into(), "-y".into(), "-q".into(), "--only-upgrade".into(), pkg])
            }
            (Manager::Apt, "uninstall") => ("apt-get", vec!["remove".into(), "-y".into(), "-q".into(), pkg]),
            (Manager::Apt, "purge") => ("apt-get", vec!["purge".into(), "-y".into(), "-q".into(), pkg]),
            (Manager::Apt, _) => ("apt-get", vec!["update".into(), "-q".into()]),
            (Manager::Dnf, "install") => {
                let target = version.map_or(pkg, |v| format!("{package}-{v}"));
                ("dnf", vec!["install".into(), "-y".into(), target])
            }
            (Manager::Dnf, "update") => ("dnf", vec!["upgrade".into(), "-y".into(), pkg]),
            (Manager::Dnf, "uninstall" | "purge") => ("dnf", vec!["remove".into(), "-y".into(), pkg]),
            (Manager::Dnf, _) => ("dnf", vec!["makecache".into()]),
        }
    }
}

/// Runs a program: exit code and its output (stdout then stderr).
async fn run(program: &str, args: &[String]) -> Result<(i32, String), String> {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("APT_LISTBUGS_FRONTEND", "none")
        .env("APT_LISTCHANGES_FRONTEND", "none");
    let finished = process::run(command, COMMAND_TIMEOUT).await.map_err(|e| format!("cannot run {program}: {e}"))?;
    if finished.timed_out {
        return Err(format!("{program} did not finish within {}s", COMMAND_TIMEOUT.as_secs()));
    }
    let mut output = String::from_utf8_lossy(&finished.stdout.bytes).into_owned();
    output.push_str(&String::from_utf8_lossy(&finished.stderr.bytes));
    Ok((finished.exit_code(), output.trim_end().to_string()))
}

/// The package's properties (the DDL's outputs); `ensure` is `absent` when not installed.
async fn properties(manager: Manager, package: &str) -> Result<JsonObject, String> {
    let absent = || json!({"name": package, "ensure": "absent", "provider": manager.name()});
    let value = match manager {
        Manager::Apt => {
            let format = "${Package} ${Version} ${Architecture} ${db:Status-Status}".to_string();
            let (code, out) = run("dpkg-query", &["-W".into(), format!("-f={format}"), package.into()]).await?;
            let fields: Vec<&str> = out.split_whitespace().collect();
            match fields.as_slice() {
                [name, full, arch, "installed"] if code == 0 => {
                    let (epoch, rest) = full.split_once(':').unwrap_or(("0", full));
                    let (version, release) = rest.rsplit_once('-').unwrap_or((rest, ""));
                    json!({"name": name, "ensure": full, "epoch": epoch, "version": version, "release": release,
                           "arch": arch, "provider": "apt"})
                }
                _ => absent(),
            }
        }
        Manager::Dnf => {
            let format = "%{NAME} %|EPOCH?{%{EPOCH}}:{0}| %{VERSION} %{RELEASE} %{ARCH}".to_string();
            let (code, out) = run("rpm", &["-q".into(), package.into(), "--queryformat".into(), format]).await?;
            match out.split_whitespace().collect::<Vec<_>>().as_slice() {
                [name, epoch, version, release, arch] if code == 0 => {
                    json!({"name": name, "ensure": format!("{version}-{release}"), "epoch": epoch, "version": version,
                           "release": release, "arch": arch, "provider": "dnf"})
                }
                _ => absent(),
            }
        }
    };
    Ok(value.as_object().cloned().unwrap_or_default())
}

fn reply(status: StatusCode, message: impl Into<String>, data: JsonObject) -> ActionReply {
    ActionReply { status, message: message.into(), data }
}

fn object(value: Value) -> JsonObject {
    value.as_object().cloned().unwrap_or_default()
}

/// `count` and `md5`: the installed packages (`name version arch` lines, sorted) counted, or
/// their MD5 digest, so fleets can be compared node by node in one summary.
async fn inventory(manager: Manager, action: &str) -> ActionReply {
    let listed = match manager {
        Manager::Apt => {
            let format = "${db:Status-Status} ${Package} ${Version} ${Architecture}\n".to_string();
            run("dpkg-query", &["-W".into(), format!("-f={format}")]).await.map(|(code, out)| {
                let lines = out.lines().filter_map(|l| l.strip_prefix("installed ")).map(str::to_string).collect();
                (code, lines)
            })
        }
        Manager::Dnf => {
            let format = "%{NAME} %{VERSION}-%{RELEASE} %{ARCH}\n".to_string();
            run("rpm", &["-qa".into(), "--queryformat".into(), format])
                .await
                .map(|(code, out)| (code, out.lines().map(str::to_string).collect()))
        }
    };
    let (code, mut packages): (i32, Vec<String>) = match listed {
        Ok(listed) => listed,
        Err(e) => return ActionReply::error(StatusCode::Aborted, e),
    };
    if code != 0 {
        let data = object(json!({"output": packages.join("\n"), "exitcode": code}));
        return reply(StatusCode::Aborted, format!("listing the installed packages failed (exit {code})"), data);
    }
    packages.sort();
    let output = if action == "count" {
        packages.len().to_string()
    } else {
        use md5::Digest as _;
        let digest = md5::Md5::digest(packages.join("\n").as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    };
    reply(StatusCode::Ok, "OK", object(json!({"output": output, "exitcode": 0})))
}

/// `search`: the packages whose names match `pattern` (a name or a glob).
async fn search(manager: Manager, pattern: &str) -> ActionReply {
    let found = match manager {
        Manager::Apt => {
            // apt-cache takes a regex; the DDL's pattern is a name or a glob.
            let regex = format!("^{}$", regex::escape(pattern).replace("\\*", ".*").replace("\\?", "."));
            run("apt-cache", &["search".into(), "--names-only".into(), regex]).await.map(|(code, out)| {
                let packages: Vec<Value> = out
                    .lines()
                    .filter_map(|l| l.split_once(" - "))
                    .map(|(name, description)| json!({"name": name.trim(), "description": description.trim()}))
                    .collect();
                (code, packages)
            })
        }
        Manager::Dnf => {
            run("dnf", &["list".into(), "-q".into(), "--available".into(), pattern.into()]).await.map(|(code, out)| {
                let packages: Vec<Value> = out
                    .lines()
                    .filter(|l| !l.starts_with("Available"))
                    .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>().as_slice() {
                        [name_arch, version, repo] => {
                            let (name, arch) = name_arch.rsplit_once('.').unwrap_or((name_arch, ""));
                            Some(json!({"name": name, "arch": arch, "version": version, "repo": repo}))
                        }
                        _ => None,
                    })
                    .collect();
                // dnf exits 1 when nothing matches: an empty result, not a failure.
                (if packages.is_empty() && code == 1 { 0 } else { code }, packages)
            })
        }
    };
    match found {
        Ok((0, packages)) => reply(
            StatusCode::Ok,
            "OK",
            object(json!({"package_count": packages.len(), "available_packages": packages})),
        ),
        Ok((code, _)) => {
            ActionReply::error(StatusCode::Aborted, format!("searching for {pattern} failed (exit {code})"))
        }
        Err(e) => ActionReply::error(StatusCode::Aborted, e),
    }
}

/// `checkupdates`: the packages an upgrade would change, as `{package, version, repo}`.
async fn check_updates(manager: Manager) -> ActionReply {
    let result = match manager {
        Manager::Apt => {
            run("apt-get", &["--simulate".into(), "-q".into(), "dist-upgrade".into()]).await.map(|(code, out)| {
                // `Inst <pkg> [<old>] (<new> <repo> [<arch>])`
                let outdated: Vec<Value> = out
                    .lines()
                    .filter_map(|l| l.strip_prefix("Inst "))
                    .filter_map(|rest| {
                        let package = rest.split_whitespace().next()?;
                        let inside = rest.split_once('(')?.1;
                        let mut words = inside.split_whitespace();
                        let version = words.next()?;
                        let repo = words.next().unwrap_or("").trim_end_matches(')');
                        Some(json!({"package": package, "version": version, "repo": repo}))
                    })
                    .collect();
                (code, out, outdated)
            })
        }
        Manager::Dnf => run("dnf", &["-q".into(), "check-update".into()]).await.map(|(code, out)| {
            let outdated: Vec<Value> = out
                .lines()
                .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>().as_slice() {
                    [name_arch, version, repo] if name_arch.contains('.') => {
                        let name = name_arch.rsplit_once('.').map_or(*name_arch, |(n, _)| n);
                        Some(json!({"package": name, "version": version, "repo": repo}))
                    }
                    _ => None,
                })
                .collect();
            // check-update exits 100 when updates are available.
            (if code == 100 { 0 } else { code }, out, outdated)
        }),
    };
    match result {
        Ok((code, output, outdated)) => {
            let data = object(json!({
                "package_manager": manager.name(), "output": output, "outdated_packages": outdated, "exitcode": code
            }));
            if code == 0 {
                reply(StatusCode::Ok, "OK", data)
            } else {
                reply(StatusCode::Aborted, format!("checking for updates failed (exit {code})"), data)
            }
        }
        Err(e) => ActionReply::error(StatusCode::Aborted, e),
    }
}

/// `yum_clean`: `dnf clean <mode>` (default `all`); nodes with apt have no yum cache.
async fn yum_clean(manager: Manager, data: &JsonObject) -> ActionReply {
    if manager != Manager::Dnf {
        return ActionReply::error(
            StatusCode::Aborted,
            "yum_clean: this node's package manager is apt, not yum or dnf",
        );
    }
    let mode = data.get("mode").and_then(Value::as_str).unwrap_or("all");
    match run("dnf", &["clean".into(), mode.into()]).await {
        Ok((code, output)) => {
            let status = if code == 0 { StatusCode::Ok } else { StatusCode::Aborted };
            let message = if code == 0 { "OK".to_string() } else { format!("dnf clean {mode} failed (exit {code})") };
            reply(status, message, object(json!({"output": output, "exitcode": code})))
        }
        Err(e) => ActionReply::error(StatusCode::Aborted, e),
    }
}

#[async_trait]
impl Agent for Package {
    fn name(&self) -> &str {
        "package"
    }

    fn ddl(&self) -> Option<&crate::ddl::Ddl> {
        super::builtin_ddl("package")
    }

    fn actions(&self) -> Vec<String> {
        [
            "checkupdates",
            "count",
            "install",
            "md5",
            "purge",
            "refresh",
            "search",
            "status",
            "uninstall",
            "update",
            "yum_clean",
        ]
        .map(String::from)
        .to_vec()
    }

    async fn handle(&self, action: &str, data: &JsonObject, _ctx: &ActionContext<'_>) -> ActionReply {
        let Some(manager) = Manager::find() else {
            return ActionReply::error(StatusCode::Aborted, "no package manager found on PATH (apt-get or dnf)");
        };
        let _one_at_a_time = PACKAGE_MANAGER.lock().await;
        match action {
            "count" | "md5" => return inventory(manager, action).await,
            "checkupdates" => return check_updates(manager).await,
            "yum_clean" => return yum_clean(manager, data).await,
            "search" => {
                return match string_input(data, "package") {
                    Ok(pattern) => search(manager, pattern).await,
                    Err(reply) => reply,
                }
            }
            _ => {}
        }
        if action == "refresh" {
            let (program, args) = manager.command("refresh", "", None);
            return match run(program, &args).await {
                Ok((code, output)) => {
                    let data = json!({"output": output, "exitcode": code}).as_object().cloned().unwrap_or_default();
                    let status = if code == 0 { StatusCode::Ok } else { StatusCode::Aborted };
                    reply(status, if code == 0 { "OK".to_string() } else { format!("{program} failed") }, data)
                }
                Err(e) => ActionReply::error(StatusCode::Aborted, e),
            };
        }
        let package = match string_input(data, "package") {
            Ok(p) => p,
            Err(reply) => return reply,
        };
        let version = data.get("version").and_then(Value::as_str);
        let before = match properties(manager, package).await {
            Ok(p) => p,
            Err(e) => return ActionReply::error(StatusCode::Aborted, e),
        };
        let installed = before.get("ensure").and_then(Value::as_str) != Some("absent");
        match (action, installed) {
            ("status", _) => return reply(StatusCode::Ok, "OK", before),
            ("install", true) if version.is_none() => {
                return reply(StatusCode::UnknownError, "Package is already installed", before)
            }
            ("update" | "uninstall" | "purge", false) => {
                return reply(StatusCode::UnknownError, "Package is not present on the system", before)
            }
            _ => {}
        }
        let (program, args) = manager.command(action, package, version);
        let outcome = run(program, &args).await;
        let mut after = match properties(manager, package).await {
            Ok(p) => p,
            Err(e) => return ActionReply::error(StatusCode::Aborted, e),
        };
        match outcome {
            Ok((0, output)) => {
                after.insert("output".into(), output.into());
                reply(StatusCode::Ok, "OK", after)
            }
            Ok((code, output)) => {
                after.insert("output".into(), output.into());
                reply(StatusCode::Aborted, format!("{program} {action} {package} failed (exit {code})"), after)
            }
            Err(e) => reply(StatusCode::Aborted, e, after),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stand-in `apt-get` and `dpkg-query`, first on PATH: a package is installed when a
    /// file of its name holds its version.
    fn stand_ins() -> tempfile::TempDir {
        super::super::stand_ins_on_path(|dir| {
            let d = dir.display();
            let apt = format!(
                r#"#!/bin/sh
verb="$1"; for last; do :; done; pkg="${{last%%=*}}"; want="${{last#*=}}"
case "$verb" in
  install) if [ "$pkg" = broken ]; then echo "E: Unable to locate package broken"; exit 100; fi
           if [ "$want" = "$last" ]; then want="1.0-1"; fi; echo "$want" > "{d}/$pkg"; echo "Setting up $pkg ($want)" ;;
  remove|purge) rm -f "{d}/$pkg"; echo "Removing $pkg" ;;
  update) echo "Reading package lists..." ;;
esac
"#
            );
            let dpkg = format!(
                r#"#!/bin/sh
for last; do :; done
if [ -f "{d}/$last" ]; then printf '%s %s amd64 installed' "$last" "$(cat "{d}/$last")"; else echo "dpkg-query: no packages found matching $last" >&2; exit 1; fi
"#
            );
            vec![("apt-get", apt), ("dpkg-query", dpkg)]
        })
    }

    async fn call(action: &str, data: Value) -> ActionReply {
        super::super::handle_on_bare_node(&Package, action, &data.as_object().cloned().unwrap()).await
    }

    #[tokio::test]
    async fn packages_install_update_and_uninstall_through_apt() {
        let _apt = stand_ins();
        let status = call("status", json!({"package": "nginx"})).await;
        assert_eq!((status.status, &status.data["ensure"]), (StatusCode::Ok, &json!("absent")));
        let installed = call("install", json!({"package": "nginx", "version": "1:1.22.1-9"})).await;
        assert_eq!(installed.status, StatusCode::Ok, "{installed:?}");
        let d = &installed.data;
        assert_eq!(
            (&d["ensure"], &d["epoch"], &d["version"], &d["release"]),
            (&json!("1:1.22.1-9"), &json!("1"), &json!("1.22.1"), &json!("9"))
        );
        assert_eq!((&d["provider"], &d["arch"]), (&json!("apt"), &json!("amd64")));
        assert!(d["output"].as_str().unwrap().contains("Setting up nginx"), "{d:?}");
        let again = call("install", json!({"package": "nginx"})).await;
        assert_eq!((again.status, again.message.as_str()), (StatusCode::UnknownError, "Package is already installed"));
        assert_eq!(call("update", json!({"package": "nginx"})).await.status, StatusCode::Ok);
        let removed = call("uninstall", json!({"package": "nginx"})).await;
        assert_eq!((removed.status, &removed.data["ensure"]), (StatusCode::Ok, &json!("absent")));
        let absent = call("purge", json!({"package": "nginx"})).await;
        assert_eq!(absent.message, "Package is not present on the system");
        let broken = call("install", json!({"package": "broken"})).await;
        assert_eq!(broken.status, StatusCode::Aborted);
        assert!(broken.data["output"].as_str().unwrap().contains("Unable to locate"), "{broken:?}");
        let refreshed = call("refresh", json!({})).await;
        assert_eq!((refreshed.status, &refreshed.data["exitcode"]), (StatusCode::Ok, &json!(0)));
    }

    /// `count`, `md5`, `search` and `checkupdates` read apt's answers as Choria's agent does;
    /// `yum_clean` refuses on an apt node.
    #[tokio::test]
    async fn package_inventory_search_and_updates_through_apt() {
        let _apt = super::super::stand_ins_on_path(|_| {
            let dpkg = r#"#!/bin/sh
printf 'installed nginx 1.22.1-9 amd64\nconfig-files old 1.0 all\ninstalled curl 7.88.1-10 amd64\n'
"#;
            let cache = r#"#!/bin/sh
[ "$1" = search ] || exit 2
printf 'nginx - small, powerful, scalable web/proxy server\nnginx-full - nginx web/proxy server (standard version)\n'
"#;
            let apt = r#"#!/bin/sh
case "$*" in
  *dist-upgrade*) printf 'Reading package lists...\nInst curl [7.88.1-10] (7.88.1-10+deb12u5 Debian-Security:12/stable-security [amd64])\nConf curl (7.88.1-10+deb12u5 Debian-Security:12/stable-security [amd64])\n' ;;
  *) exit 1 ;;
esac
"#;
            vec![("dpkg-query", dpkg.to_string()), ("apt-cache", cache.to_string()), ("apt-get", apt.to_string())]
        });
        let count = call("count", json!({})).await;
        assert_eq!(
            (count.status, &count.data["output"], &count.data["exitcode"]),
            (StatusCode::Ok, &json!("2"), &json!(0))
        );
        let md5 = call("md5", json!({})).await;
        let digest = md5.data["output"].as_str().unwrap().to_string();
        assert_eq!(digest.len(), 32, "{md5:?}");
        assert_eq!(call("md5", json!({})).await.data["output"], json!(digest), "the same list, the same digest");
        let found = call("search", json!({"package": "nginx*"})).await;
        assert_eq!((found.status, &found.data["package_count"]), (StatusCode::Ok, &json!(2)), "{found:?}");
        assert_eq!(found.data["available_packages"][1]["name"], "nginx-full");
        let updates = call("checkupdates", json!({})).await;
        assert_eq!(updates.status, StatusCode::Ok, "{updates:?}");
        assert_eq!(updates.data["package_manager"], "apt");
        assert_eq!(
            updates.data["outdated_packages"],
            json!([{"package": "curl", "version": "7.88.1-10+deb12u5", "repo": "Debian-Security:12/stable-security"}])
        );
        let clean = call("yum_clean", json!({"mode": "all"})).await;
        assert_eq!(clean.status, StatusCode::Aborted);
        assert!(clean.message.contains("apt"), "{clean:?}");
    }
}
