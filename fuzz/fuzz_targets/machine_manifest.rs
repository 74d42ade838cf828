//! Feeds arbitrary text to `Manifest::from_yaml`, the `machine.yaml` of an autonomous agent,
//! which every node loads unattended (durations, cron lines, references between watchers,
//! transitions and states included).
//!
//! Properties checked:
//! * parsing and validation never panic (libFuzzer reports any panic as a crash);
//! * every rejection names the field at fault, and its message renders;
//! * what is accepted validates again, and hangs together: the initial state is a state,
//!   every `state_match` names a state and every watcher's transitions exist.
//!
//! Run: `cargo fuzz run machine_manifest fuzz/seeds/machine_manifest`.

#![no_main]

use chorus_producers::machine::{Manifest, ManifestError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let manifest = match Manifest::from_yaml(text) {
        Ok(manifest) => manifest,
        Err(e) => {
            let message = e.to_string();
            assert!(matches!(e, ManifestError::Invalid { .. }), "not an Invalid error: {message}");
            assert!(e.field().is_some_and(|f| !f.is_empty()), "rejection names no field: {message}");
            return;
        }
    };
    if let Err(e) = manifest.validate() {
        panic!("an accepted manifest does not validate again: {e}");
    }
    let states = manifest.states();
    assert!(states.contains(manifest.initial_state.as_str()), "the initial state is not a state");
    let transitions: Vec<&str> = manifest.transitions.iter().map(|t| t.name.as_str()).collect();
    for watcher in &manifest.watchers {
        assert!(watcher.state_match.iter().all(|s| states.contains(s.as_str())), "unknown state in {watcher:?}");
        for t in [&watcher.success_transition, &watcher.fail_transition].into_iter().flatten() {
            assert!(transitions.contains(&t.as_str()), "unknown transition {t:?} in {watcher:?}");
        }
        assert!(
            watcher.state_match.is_empty() || watcher.state_match.iter().any(|s| watcher.active_in(s)),
            "a watcher is not active in its own states"
        );
        let _ = watcher.watcher_type();
    }
});
