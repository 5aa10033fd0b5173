//! `quorum qemu-args`: the same disk for QEMU's own quorum driver.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use quorum_config::qemu::{self, NbdAddr};

/// Print QEMU arguments that build this disk with QEMU's quorum driver.
///
/// Nodes follow libvirt's conventions (a storage and a format node per layer,
/// deepest layer first) under a prefix of our own, so that they never clash
/// with the `libvirt-N-storage` / `libvirt-N-format` nodes of a domain's other
/// disks: `quorum-DEV-N-storage`, `quorum-DEV-N-format`, then the quorum
/// node `quorum-DEV` (change the prefix with --node-prefix).
/// `--format argv` and `--format qsd` print one argument per line, to read
/// into a bash array with `mapfile -t`; `--format shell` (the default) prints
/// `-blockdev '{...}'` lines to paste into a command line; `--format json`
/// prints one nested object for `qemu-io`/`qemu-img`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Formats:
  shell  one `-blockdev '{...}'` per line, shell-quoted, to paste into a command line
         by hand. Not for $(...): the shell does not undo quotes it substitutes.
  argv   one argument per line: `--blockdev`, then its JSON, for every node. For
         qemu-system-* and qemu-storage-daemon through `mapfile -t` (bash) or
         `xargs -d '\\n'`.
  qsd    argv, then `--nbd-server` and `--export type=nbd,...` lines that export the
         quorum node over NBD: a whole qemu-storage-daemon command line. It listens on
         --socket PATH or --listen HOST:PORT (default 127.0.0.1:10809); the export is
         named after the target dev (or --export NAME), writable unless <readonly/>.
  json   one nested JSON object, for `qemu-io \"json:...\"` or `qemu-img info \"json:...\"`
         (add -r to qemu-io for a <readonly/> disk). --json is short for --format json.

Node names: every layer N gets `PREFIX-N-storage` (and `PREFIX-N-format` when it is
qcow2), the quorum node is `PREFIX` itself. PREFIX defaults to `quorum-DEV` (e.g.
`quorum-vda`), which neither clashes with libvirt's `libvirt-N-storage` nodes nor with a
second quorum disk of the same VM. QEMU limits node names to 31 bytes.

Examples (bash):
  # qemu-storage-daemon serving the disk over NBD on ./vda.sock
  mapfile -t args < <(quorum qemu-args disk.xml --format qsd --socket vda.sock)
  qemu-storage-daemon \"${args[@]}\"

  # a VM whose virtio disk is QEMU's quorum of the replicas
  mapfile -t args < <(quorum qemu-args disk.xml --format argv)
  qemu-system-x86_64 -display none -monitor stdio \"${args[@]}\" -device virtio-blk-pci,drive=quorum-vda

  qemu-io -c 'read 0 1M' \"json:$(quorum qemu-args --json disk.xml)\"")]
pub struct Args {
    /// The XML file (`-`: standard input): a `<disk type='quorum'>`, or a whole
    /// `<domain>` holding it under `<devices>` or in quorum's `<metadata>`.
    pub file: PathBuf,
    /// Pick the disk whose `<target dev=...>` is DEV (default: the first quorum disk).
    #[arg(long, value_name = "DEV")]
    pub target: Option<String>,
    /// Output form: shell, argv, qsd or json (see below).
    #[arg(long, value_enum, default_value_t = Format::Shell)]
    pub format: Format,
    /// Print one nested JSON object (the same as --format json).
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// With --format qsd: the unix socket qemu-storage-daemon's NBD server listens on.
    #[arg(long, value_name = "PATH", conflicts_with = "listen")]
    pub socket: Option<PathBuf>,
    /// With --format qsd: the TCP address it listens on (default 127.0.0.1:10809).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,
    /// With --format qsd: the NBD export name (default: the disk's target dev).
    #[arg(long, value_name = "NAME")]
    pub export: Option<String>,
    /// Name the nodes PREFIX-N-storage, PREFIX-N-format and PREFIX (default: quorum-DEV).
    #[arg(long, value_name = "PREFIX", value_parser = qemu::NodeNames::with_prefix)]
    pub node_prefix: Option<qemu::NodeNames>,
}

/// `--format` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `-blockdev '{...}'` lines, shell-quoted, for pasting.
    Shell,
    /// One argument per line: `--blockdev`, JSON, ...
    Argv,
    /// argv plus the NBD server and export for qemu-storage-daemon.
    Qsd,
    /// One nested JSON object.
    Json,
}

/// Quote `s` for a POSIX shell: single quotes, each `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let format = if args.json { Format::Json } else { args.format };
    if format != Format::Qsd
        && (args.socket.is_some() || args.listen.is_some() || args.export.is_some())
    {
        bail!("--socket, --listen and --export go with --format qsd");
    }
    let Some(cfg) = super::validate::load_or_report(&args.file, args.target.as_deref()) else {
        return Ok(ExitCode::from(1));
    };
    let names = args
        .node_prefix
        .unwrap_or_else(|| qemu::NodeNames::for_disk(&cfg));
    match format {
        Format::Json => println!("{}", qemu::nested_json(&cfg)),
        Format::Shell => {
            for node in qemu::blockdev_args_named(&cfg, &names) {
                println!("-blockdev {}", shell_quote(&node.to_string()));
            }
        }
        Format::Argv | Format::Qsd => {
            let mut lines = qemu::argv_named(&cfg, &names);
            if format == Format::Qsd {
                let addr = match (&args.socket, args.listen) {
                    (Some(p), _) => NbdAddr::Unix(p.clone()),
                    (None, Some(a)) => NbdAddr::Inet {
                        host: a.ip().to_string(),
                        port: a.port(),
                    },
                    (None, None) => NbdAddr::Inet {
                        host: "127.0.0.1".into(),
                        port: 10809,
                    },
                };
                let name = args.export.as_deref().unwrap_or(&cfg.target.dev);
                lines.extend(
                    qemu::qsd_nbd_export_named(&cfg, &names, &addr, name)
                        .map_err(anyhow::Error::msg)?,
                );
            }
            for l in lines {
                println!("{l}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn shell_quote_wraps_in_single_quotes() {
        assert_eq!(shell_quote(r#"{"a":1}"#), r#"'{"a":1}'"#);
    }

    #[test]
    fn shell_quote_escapes_embedded_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
