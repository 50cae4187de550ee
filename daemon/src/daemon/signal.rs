//! What the outside world asks of a running daemon, as a stream of [`Signal`]s
//! (vector's `src/signal.rs`): [`os_signals`] maps the process's own signals
//! (SIGTERM and SIGINT stop, SIGHUP reloads) for `millrace daemon`; [`until`]
//! turns any future into a shutdown (mini-redis's `server::run(listener,
//! shutdown)`), for a daemon run inside another program or a test.

use std::future::Future;

use futures_util::Stream;
use futures_util::StreamExt;

/// A request to the daemon from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Read every pipeline file again, also those whose text is unchanged.
    Reload,
    /// Stop: no new triggers or steps, running steps get the grace period.
    Shutdown,
}

/// SIGTERM and SIGINT → [`Signal::Shutdown`], SIGHUP → [`Signal::Reload`].
/// The handlers are installed when this is called, so a signal that arrives
/// before the daemon is ready waits in the stream instead of killing the
/// process half-started.
pub fn os_signals() -> std::io::Result<impl Stream<Item = Signal>> {
    use tokio::signal::unix::{SignalKind, signal};
    let hup = signal(SignalKind::hangup())?;
    let term = signal(SignalKind::terminate())?;
    let int = signal(SignalKind::interrupt())?;
    Ok(futures_util::stream::unfold(
        (hup, term, int),
        |(mut hup, mut term, mut int)| async move {
            let asked = tokio::select! {
                _ = hup.recv() => Signal::Reload,
                _ = term.recv() => Signal::Shutdown,
                _ = int.recv() => Signal::Shutdown,
            };
            Some((asked, (hup, term, int)))
        },
    ))
}

/// One [`Signal::Shutdown`] when `shutdown` completes, and nothing before.
pub fn until(shutdown: impl Future<Output = ()>) -> impl Stream<Item = Signal> {
    futures_util::stream::once(shutdown).map(|()| Signal::Shutdown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_shutdown_future_is_one_shutdown_then_the_end() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let signals = until(async {
            let _ = rx.await;
        });
        tx.send(()).unwrap();
        assert_eq!(signals.collect::<Vec<_>>().await, vec![Signal::Shutdown]);
    }
}
