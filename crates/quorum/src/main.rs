//! `quorum`: one virtual disk on N replicas, voted on every read.
//!
//! The binary is thin: clap parses the command line and each subcommand in
//! `cmd/` drives the library crates.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod output;
mod server;
mod signals;

/// A voted virtual disk over N replicas, configured with libvirt disk XML.
///
/// Reads are served only when at least `threshold` replicas return the same
/// bytes (voted per 4 KiB block); writes go to every replica.
#[derive(Debug, Parser)]
#[command(name = "quorum", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a quorum disk XML document (like `virsh define`, without running anything).
    Validate(cmd::validate::Args),
    /// Print the quorum disk in canonical XML.
    Dumpxml(cmd::dumpxml::Args),
    /// Print `-blockdev` arguments for QEMU's own quorum driver.
    QemuArgs(cmd::qemu_args::Args),
    /// Export the voted disk over NBD.
    Serve(cmd::serve::Args),
    /// Scrub every replica offline, report divergence, optionally repair.
    Check(cmd::check::Args),
    /// Create the replica images that are missing.
    Create(cmd::create::Args),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help, --version (exit 0) or a usage error (exit 2); a closed
            // stdout or stderr only loses the text.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // `serve` must outlive any reader of its output, and `check` reports its
    // verdict in its exit status even when nobody reads the table: both keep
    // SIGPIPE ignored and drop text that cannot be written. The commands
    // that only print (or, for `create`, print after each finished image)
    // die quietly from SIGPIPE, as Unix tools piped into `head` do.
    if !matches!(cli.command, Command::Serve(_) | Command::Check(_)) {
        signals::default_sigpipe();
    }
    let result = match cli.command {
        Command::Validate(a) => cmd::validate::run(a),
        Command::Dumpxml(a) => cmd::dumpxml::run(a),
        Command::QemuArgs(a) => cmd::qemu_args::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Check(a) => cmd::check::run(a),
        Command::Create(a) => cmd::create::run(a),
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "quorum: {e:#}");
            ExitCode::from(1)
        }
    };
    if let Some(e) = output::stdout_error() {
        let _ = writeln!(std::io::stderr(), "quorum: cannot write the output: {e}");
        if code == ExitCode::SUCCESS {
            return ExitCode::from(1);
        }
    }
    code
}
