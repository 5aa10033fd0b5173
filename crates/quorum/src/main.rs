//! `quorum`: one virtual disk on N replicas, voted on every read.
//!
//! The binary is thin: clap parses the command line and each subcommand in
//! `cmd/` drives the library crates.

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
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate(a) => cmd::validate::run(a),
        Command::Dumpxml(a) => cmd::dumpxml::run(a),
        Command::QemuArgs(a) => cmd::qemu_args::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Check(a) => cmd::check::run(a),
        Command::Create(a) => cmd::create::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("quorum: {e:#}");
            ExitCode::from(1)
        }
    }
}
