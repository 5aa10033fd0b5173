//! `quorum qemu-args`: the same disk for QEMU's own quorum driver.

use std::path::PathBuf;
use std::process::ExitCode;

/// Print QEMU arguments that build this disk with QEMU's quorum driver.
///
/// Default: one `-blockdev '{...}'` per line, shell-quoted, in libvirt's
/// conventions (`libvirt-N-storage` / `libvirt-N-format` nodes, deepest first),
/// ending with the quorum node `libvirt-quorum-DEV`. Paste them into a
/// `qemu-system-*` or `qemu-storage-daemon` command line (the daemon spells it
/// `--blockdev`).
///
/// With `--json`: one nested JSON object, for `qemu-io "json:$(quorum qemu-args --json FILE)"`
/// or `qemu-img info "json:..."` (add `-r` to qemu-io for a `<readonly/>` disk).
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Default output: one `-blockdev '{...}'` per line, shell-quoted, libvirt-style node names
(`libvirt-N-storage`, `libvirt-N-format`), deepest layer first, the quorum node
`libvirt-quorum-DEV` last. qemu-storage-daemon spells the option `--blockdev`.

Examples:
  quorum qemu-args disk.xml
  qemu-io -c 'read 0 1M' \"json:$(quorum qemu-args --json disk.xml)\"")]
pub struct Args {
    /// The XML file: a `<disk type='quorum'>` or a whole `<domain>`.
    pub file: PathBuf,
    /// Pick the disk whose `<target dev=...>` is DEV (default: the first quorum disk).
    #[arg(long, value_name = "DEV")]
    pub target: Option<String>,
    /// Print one nested JSON object instead of `-blockdev` lines.
    #[arg(long)]
    pub json: bool,
}

/// Quote `s` for a POSIX shell: single quotes, each `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Some(cfg) = super::validate::load_or_report(&args.file, args.target.as_deref()) else {
        return Ok(ExitCode::from(1));
    };
    if args.json {
        println!("{}", quorum_config::qemu::nested_json(&cfg));
    } else {
        for node in quorum_config::qemu::blockdev_args(&cfg) {
            println!("-blockdev {}", shell_quote(&node.to_string()));
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
