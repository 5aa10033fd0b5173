//! Printing and logging that can never fail a command or the daemon.
//!
//! `println!`/`eprintln!` panic when the write fails, and so does
//! tracing's fmt layer (it reports its own write errors with `eprintln!`).
//! With stderr piped into a reader that exits (`quorum serve 2>&1 | head -1`)
//! such a panic inside request handling turned a majority read into EIO and
//! inside the signal task left the daemon unstoppable. Here:
//!
//! - [`Lossy`] wraps a writer and drops what cannot be written; `serve`
//!   logs and prints through it, so a closed stdout/stderr only loses text.
//! - [`outln!`] prints a line on stdout for the other commands: once the
//!   reader is gone (EPIPE) the rest of the text is dropped and the command
//!   finishes with its own exit code, like a Unix tool piped into `head`;
//!   any other write error (a full disk) makes `main` report it and fail.

use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// A writer that reports success whatever happens to the bytes: a closed
/// pipe, a full disk or a revoked terminal lose the text, nothing else.
#[derive(Debug)]
pub struct Lossy<W>(pub W);

impl<W: Write> Write for Lossy<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// stderr through [`Lossy`] (a `MakeWriter` for tracing).
pub fn lossy_stderr() -> Lossy<io::Stderr> {
    Lossy(io::stderr())
}

/// stdout through [`Lossy`].
pub fn lossy_stdout() -> Lossy<io::Stdout> {
    Lossy(io::stdout())
}

/// Logging for `serve`: tracing's fmt layer on stderr, at `info` unless
/// RUST_LOG says otherwise. Nothing a log line does can panic or block
/// on an error: writes go through [`Lossy`], and the layer's own error
/// reporting (an `eprintln!`, which panics on EPIPE) is off.
pub fn init_serve_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(lossy_stderr)
        .log_internal_errors(false)
        .try_init();
}

/// Set once stdout's reader has gone: later lines are not even tried.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
/// The first stdout error other than EPIPE, for `main` to report.
static STDOUT_ERROR: Mutex<Option<io::Error>> = Mutex::new(None);

/// Write formatted text to stdout; see [`outln!`].
pub fn print_out(args: std::fmt::Arguments<'_>) {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = io::stdout().lock().write_fmt(args) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
        } else {
            let mut first = STDOUT_ERROR.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert(e);
        }
    }
}

/// Flush stdout and take the first write error that was not EPIPE.
pub fn stdout_error() -> Option<io::Error> {
    if !STDOUT_CLOSED.load(Ordering::Relaxed)
        && let Err(e) = io::stdout().lock().flush()
        && e.kind() != io::ErrorKind::BrokenPipe
    {
        return Some(e);
    }
    STDOUT_ERROR
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
}

/// `println!` that never panics: a closed stdout drops the text (the
/// command carries on and exits with its own code); other write errors
/// are reported by `main` once the command is done.
macro_rules! outln {
    () => {
        $crate::output::print_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::print_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;
