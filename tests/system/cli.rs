//! Running the `chorus` binary as an operator would.

/// `chorus` with `args`, without the caller's key settings of the environment (`CHORUS_KEY`,
/// `CHORUS_CREDENTIAL`, `CHORUS_ISSUERS`): whether it succeeded, and its standard output
/// followed by its standard error.
pub fn chorus(args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(chorus_testkit::workspace_bin("chorus").expect("the chorus binary"))
        .args(args)
        .env("CHORUS_LOG", "warn")
        .env_remove("CHORUS_KEY")
        .env_remove("CHORUS_CREDENTIAL")
        .env_remove("CHORUS_ISSUERS")
        .output()
        .expect("chorus runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.success(), format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)))
}
