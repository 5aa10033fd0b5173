//! `quorum`: one virtual disk on N replicas, voted on every read.
//!
//! The binary is thin: clap parses the command line and each subcommand in
//! `cmd/` drives the library crates.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod metrics;
mod output;
mod qmp;
mod server;
mod signals;

/// Exit status of every command. Values are bits (as fsck's are) so that
/// no result of `check` is ever mistaken for a usage error.
pub mod exit {
    /// Success: the command did what was asked (`check`: all replicas agree,
    /// or every divergence was repaired).
    pub const OK: u8 = 0;
    /// Operational error: invalid XML, a replica that cannot be opened, an
    /// I/O error.
    pub const ERROR: u8 = 1;
    /// Usage error: unknown option, missing or malformed argument (clap).
    pub const USAGE: u8 = 2;
    /// `check`: replicas diverge and the divergence was not repaired.
    pub const DIVERGENT: u8 = 4;
    /// `check`: some blocks have no quorum (never repaired by guessing).
    pub const NO_QUORUM: u8 = 8;
}

/// A voted virtual disk over N replicas, configured with libvirt disk XML.
///
/// Reads are served only when at least `threshold` replicas return the same
/// bytes (voted per 4 KiB block); writes go to every replica.
#[derive(Debug, Parser)]
#[command(
    name = "quorum",
    version,
    propagate_version = true,
    after_long_help = "\
Exit status (the same for every command):
  0   success (check: all replicas agree, or every divergence was repaired)
  1   error: invalid XML, a replica that cannot be opened, an I/O error
  2   usage error: unknown option, missing or malformed argument
  4   check: divergence found and not repaired
  8   check: blocks without quorum (never repaired by guessing)
check adds 4 and 8 when both hold (12); a command killed by a signal shows
128+N in the shell. Errors print each cause once, then a `hint:` line where
the fix is known.

Signals: quorum serve stops gracefully on SIGTERM, SIGINT or SIGHUP (as
qemu-nbd and qemu-storage-daemon do) and ignores SIGPIPE. Printing commands
stop quietly when their output is closed (`quorum dumpxml d.xml | head -1`)."
)]
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
    /// Show replica states, missed writes and counters: live from the running daemon, else from the record.
    Status(cmd::status::Args),
    /// Replace a replica of a running disk by a new image (hot replace, through the monitor).
    Replace(cmd::replace::Args),
    /// Scrub a running disk online (through the monitor); `check` does it offline.
    Scrub(cmd::scrub::Args),
    /// Convert a domain between `<disk type='quorum'>` and what stock libvirt accepts.
    Domxml(cmd::domxml::Args),
    /// Define a domain with `<disk type='quorum'>` disks in libvirt (to-libvirt + virsh define --validate).
    Define(cmd::define::Args),
    /// libvirt's qemu hook: start and stop `quorum serve` for a domain's quorum disks.
    LibvirtHook(cmd::libvirt_hook::Args),
    /// Attach a `<disk type='quorum'>` to a libvirt domain (starts its daemon with --live).
    Attach(cmd::hotplug::AttachArgs),
    /// Detach a quorum disk from a libvirt domain (stops its daemon with --live).
    Detach(cmd::hotplug::DetachArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help, --version (exit 0) or a usage error (exit 2); a closed
            // stdout or stderr only loses the text.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
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
        Command::Status(a) => cmd::status::run(a),
        Command::Replace(a) => cmd::replace::run(a),
        Command::Scrub(a) => cmd::scrub::run(a),
        Command::Domxml(a) => cmd::domxml::run(a),
        Command::Define(a) => cmd::define::run(a),
        Command::LibvirtHook(a) => cmd::libvirt_hook::run(a),
        Command::Attach(a) => cmd::hotplug::attach(a),
        Command::Detach(a) => cmd::hotplug::detach(a),
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            ExitCode::from(exit::ERROR)
        }
    };
    if let Some(e) = output::stdout_error() {
        let _ = writeln!(std::io::stderr(), "quorum: cannot write the output: {e}");
        if code == ExitCode::SUCCESS {
            return ExitCode::from(exit::ERROR);
        }
    }
    code
}

/// An error whose fix is known: `report` prints `hint` on its own line.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Hinted {
    /// What went wrong.
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

/// Print `e` on stderr: every cause once (`a: b: c`), then one `hint:` line
/// per cause whose fix is known. Never panics, even on a closed stderr.
fn report(e: &anyhow::Error) {
    let mut text = format!("quorum: {}\n", chain_once(e));
    let mut hints: Vec<String> = Vec::new();
    for cause in e.chain() {
        let hint = cause
            .downcast_ref::<quorum_replica::OpenError>()
            .and_then(quorum_replica::OpenError::hint)
            .or_else(|| cause.downcast_ref::<Hinted>().map(|h| h.hint.clone()));
        if let Some(hint) = hint
            && !hints.contains(&hint)
        {
            hints.push(hint);
        }
    }
    for hint in hints {
        text.push_str(&format!("hint: {hint}\n"));
    }
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// The causes of `e` joined by `: ` (anyhow's `{:#}`), leaving out a cause
/// whose text the previous one already ends with: an error type that still
/// prints its source in its own message then does not say it twice.
fn chain_once(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !previous.is_empty() && previous.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        previous = text;
    }
    out
}
