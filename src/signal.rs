//! Signals, handled here only: libraries take a `chorus_runtime::Shutdown` and never install
//! handlers.

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; stopping on Ctrl-C only");
            // Ctrl-C's own error (no handler either) leaves nothing to wait for.
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Completes on SIGTERM, SIGINT, or when one of `services` fails for good (a process that
/// runs them should then stop and exit with the error, for its supervisor to restart it).
pub async fn until_signal_or_failure(services: &chorus_runtime::Services) {
    let mut check = tokio::time::interval(std::time::Duration::from_millis(500));
    tokio::select! {
        _ = terminated() => {}
        _ = async {
            loop {
                check.tick().await;
                if services.any_failed() {
                    return;
                }
            }
        } => {}
    }
}
