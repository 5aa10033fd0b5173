//! `quorum replace`: swap a replica of a running disk, through its monitor.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::monitor::MonitorArgs;
use crate::output::outln;

/// Replace a replica of a running disk by a new image while the disk
/// serves. The new replica is given as one libvirt `<backingStore>`
/// element, in a file or on standard input (`-`); it is opened, locked and
/// rebuilt in full in the background, and votes only once in-sync; the
/// old one is released.
///
/// Arguments: FILE REPLICA NEW.xml, or --qmp PATH REPLICA NEW.xml. REPLICA
/// is a node name as `quorum status` shows it (`replica-1`).
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Exit status:
  0   replaced (with --wait: and the new replica is in-sync)
  1   error: no running daemon, the monitor refused (unknown replica,
      invalid or unreachable new image), or the rebuild failed
  2   usage error

Examples:
  cat > new.xml <<'XML'
  <backingStore type='file'>
    <format type='raw'/>
    <source file='/srv/disks/vda-r1-new.raw'/>
  </backingStore>
  XML
  qemu-img create -f raw /srv/disks/vda-r1-new.raw 10G
  quorum replace disk.xml replica-1 new.xml --wait
  quorum replace --qmp /run/quorum/vda.qmp replica-2 - < new.xml")]
pub struct Args {
    /// FILE REPLICA NEW.xml (or REPLICA NEW.xml with --qmp); options may
    /// come between them.
    #[arg(value_name = "[FILE] REPLICA NEW.xml", num_args = 1..=3, required = true)]
    pub args: Vec<PathBuf>,
    #[command(flatten)]
    pub monitor: MonitorArgs,
    /// Wait until the new replica is in-sync, with a progress bar on a terminal.
    #[arg(long)]
    pub wait: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (file, replica, new) = match (args.monitor.qmp.is_some(), args.args.as_slice()) {
        (false, [f, r, n]) => (Some(f.as_path()), r, n),
        (true, [r, n]) => (None, r, n),
        _ => {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"quorum replace: give FILE REPLICA NEW.xml, or --qmp PATH REPLICA NEW.xml\n",
            );
            return Ok(ExitCode::from(crate::exit::USAGE));
        }
    };
    let replica = replica.to_string_lossy().into_owned();
    let xml = if new.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the new <backingStore> from standard input")?;
        s
    } else {
        std::fs::read_to_string(new).with_context(|| format!("cannot read {}", new.display()))?
    };
    let mut c = super::monitor::connect(file, &args.monitor)?;
    c.execute(
        "quorum-replica-replace",
        json!({"replica": replica, "backing-store": xml}),
    )
    .with_context(|| format!("cannot replace {replica}"))?;
    if !args.wait {
        outln!("{replica} replaced; it is rebuilt in the background (`quorum status` shows it)");
        return Ok(ExitCode::SUCCESS);
    }
    let bar = if std::io::stderr().is_terminal() {
        let pb = ProgressBar::new(100);
        pb.set_style(
            ProgressStyle::with_template("rebuild {bar:40} {pos}% eta {eta}")
                .context("progress template")?,
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    loop {
        let q = c.execute("query-quorum", json!({}))?;
        let Some(r) = q["replicas"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["name"] == replica.as_str()))
            .cloned()
        else {
            bail!("{replica} is no longer part of the disk");
        };
        match r["state"].as_str() {
            Some("in-sync") => break,
            Some("failed") => bail!(
                "{replica} failed while rebuilding: {}",
                r["reason"].as_str().unwrap_or("no reason given")
            ),
            _ => bar.set_position(r["resync-progress"].as_u64().unwrap_or(0)),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bar.finish_and_clear();
    outln!("{replica} replaced and in-sync");
    Ok(ExitCode::SUCCESS)
}
