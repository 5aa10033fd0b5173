//! Printing and logging that can never fail a command or the daemon.
//!
//! `println!`/`eprintln!` panic when the write fails, and so does
//! tracing's fmt layer (it reports its own write errors with `eprintln!`).
//! With stderr piped into a reader that exits (`quorum serve 2>&1 | head -1`)
//! such a panic inside request handling turned a majority read into EIO and
//! inside the signal task left the daemon unstoppable. Here:
//!
//! [`Lossy`] wraps a writer and drops what cannot be written; `serve` logs
//! and prints through it, so a closed stdout/stderr only loses text.

use std::io::{self, IsTerminal, Write};

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
