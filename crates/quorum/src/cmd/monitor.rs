//! Finding and asking a running daemon's monitor, for the CLI clients
//! (`status`, `replace`, `scrub`).
//!
//! `quorum serve` writes `<record>.run` (`{"pid", "qmp", "export"}`) once
//! it listens and removes it at stop; a daemon counts as running when that
//! PID is alive and its monitor socket answers.

use std::path::{Path, PathBuf};

use crate::Hinted;
use crate::qmp::client::Client;
use crate::qmp::server::{RunFile, run_file_path};

/// How a command names the daemon to talk to.
#[derive(Debug, Clone, clap::Args)]
pub struct MonitorArgs {
    /// The daemon's monitor socket (`quorum serve --qmp PATH`), instead of FILE.
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<PathBuf>,
    /// Which disk of a <domain> FILE (its target dev); default: the first quorum disk.
    #[arg(long, value_name = "DEV")]
    pub target: Option<String>,
    /// The disk's record, when serve was given --state; default: as serve's.
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,
}

/// The record path of the disk in `file`: `--state`, else the default.
pub fn record_path(
    file: &Path,
    target: Option<&str>,
    state: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    if let Some(s) = state {
        return Ok(s.to_owned());
    }
    let cfg = super::util::load_disk(file, target)?;
    Ok(super::state::default_path(&cfg))
}

/// The running daemon of the disk whose record is `record`: its monitor
/// socket and a negotiated connection; `Err` says why there is none.
pub fn find_running(record: &Path) -> Result<(PathBuf, Client), String> {
    let run = run_file_path(record);
    let Some(rf) = RunFile::read(&run) else {
        return Err(format!("{} does not exist", run.display()));
    };
    if !rf.alive() {
        return Err(format!(
            "{} names PID {}, which is gone",
            run.display(),
            rf.pid
        ));
    }
    let Some(qmp) = rf.qmp else {
        return Err(format!(
            "the daemon (PID {}) runs without a monitor (--no-qmp)",
            rf.pid
        ));
    };
    match Client::connect(&qmp) {
        Ok(c) => Ok((qmp, c)),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Connect to the monitor named by `--qmp`, or to the running daemon of
/// the disk in `file`.
pub fn connect(file: Option<&Path>, m: &MonitorArgs) -> anyhow::Result<Client> {
    if let Some(q) = &m.qmp {
        return Client::connect(q);
    }
    let Some(file) = file else {
        anyhow::bail!("give the disk's XML FILE or --qmp PATH");
    };
    let record = record_path(file, m.target.as_deref(), m.state.as_deref())?;
    find_running(&record).map(|(_, c)| c).map_err(|why| {
        anyhow::Error::new(Hinted {
            message: format!("no running `quorum serve` for {}: {why}", file.display()),
            hint: "start it with `quorum serve FILE`, pass its socket with --qmp PATH, or use `quorum check` on a stopped disk".into(),
        })
    })
}
