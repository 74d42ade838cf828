//! Signals, handled here only: libraries take a `chorus_runtime::Shutdown` and never install
//! handlers.

use chorus_runtime::{Services, Shutdown};
use tokio::signal::unix::{signal, SignalKind};

/// Requests `shutdown` on SIGTERM or SIGINT (Ctrl-C). The handlers are installed before this
/// returns, so a signal that arrives while services are still starting (their broker down, a
/// slow fact command) stops them cleanly, with their drain and shutdown events, instead of
/// killing the process.
pub fn request_on_signal(shutdown: &Shutdown) {
    let (term, interrupt) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        match (term, interrupt) {
            (Ok(mut term), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            (term, interrupt) => {
                let e = term.err().or(interrupt.err()).map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!(error = %e, "no SIGTERM/SIGINT handler; stop with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
        shutdown.request();
    });
}

/// Completes once `shutdown` is requested (see [`request_on_signal`]) or one of `services`
/// fails for good (a process that runs them should then stop and exit with the error, for
/// its supervisor to restart it).
pub async fn until_shutdown_or_failure(shutdown: &Shutdown, services: &Services) {
    let mut check = tokio::time::interval(std::time::Duration::from_millis(500));
    tokio::select! {
        _ = shutdown.requested() => {}
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

/// Completes on SIGTERM, SIGINT, or when one of `services` fails for good.
pub async fn until_signal_or_failure(services: &Services) {
    let shutdown = Shutdown::new();
    request_on_signal(&shutdown);
    until_shutdown_or_failure(&shutdown, services).await
}

/// Completes on SIGTERM or SIGINT.
pub async fn terminated() {
    let shutdown = Shutdown::new();
    request_on_signal(&shutdown);
    shutdown.requested().await
}
