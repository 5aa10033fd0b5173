//! The signals that stop `quorum serve`, handled as qemu-nbd and
//! qemu-storage-daemon handle them: SIGTERM, SIGINT and SIGHUP all stop the
//! daemon gracefully (in-flight requests finish, replicas are flushed and
//! unlocked, the socket and pid file are removed, exit status 0). SIGPIPE
//! is ignored, so a client or log reader that goes away costs an EPIPE on
//! that one write, never the process.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Installed handlers for the stop signals.
pub struct StopSignals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl StopSignals {
    /// Install the handlers (inside the runtime, before serving) and make
    /// sure SIGPIPE is ignored. Failing here fails the start: a daemon that
    /// a SIGTERM would kill without flushing must not serve.
    pub fn install() -> std::io::Result<StopSignals> {
        ignore_sigpipe()?;
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Wait for the first stop signal, cancel `shutdown`, and only then say
    /// so: nothing that logging does can delay or prevent the stop.
    pub async fn stop_on_signal(mut self, shutdown: CancellationToken) {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.hup.recv() => "SIGHUP",
        };
        shutdown.cancel();
        tracing::info!("{name}: shutting down");
    }
}

/// Ignore SIGPIPE (Rust's runtime does so before `main`; this keeps it so
/// whatever ran before).
fn ignore_sigpipe() -> std::io::Result<()> {
    // SAFETY: installing SIG_IGN has no handler code to be unsafe about.
    let previous = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    if previous == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Give SIGPIPE its default action, for the commands that only print: once
/// their reader is gone they die quietly, as `cat` or `ls` piped into
/// `head` do, instead of reporting a write error.
pub fn default_sigpipe() {
    // SAFETY: as above; SIG_DFL restores the kernel's default action.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}
