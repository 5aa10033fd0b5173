//! `quorum libvirt-hook`: the program libvirt runs as
//! `/etc/libvirt/hooks/qemu.d/50-quorum` around a domain's life.
//!
//! libvirt calls it as `50-quorum DOMAIN OPERATION SUB-OPERATION EXTRA` with
//! the domain XML on stdin. It acts only on domains whose `<metadata>` holds
//! quorum disks (see `quorum domxml`), never calls back into libvirt (that
//! would deadlock), and keeps its state under `RUNTIME_DIR/DOMAIN/`:
//!
//! ```text
//!  DEV.xml   the disk, extracted from the domain XML, that the daemon serves
//!  DEV.pid   the daemon's PID (written by `quorum serve --pid-file`)
//!  DEV.log   the daemon's stdout and stderr
//!  DEV.sock  the NBD socket QEMU connects to (where the export says)
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use quorum_config::libvirt::{self, DomainDisks, Export};

use super::daemon::{lookup_group, lookup_user};

/// libvirt's qemu hook for quorum disks.
///
/// Install it once (libvirt >= 6.5 runs every script in qemu.d; restart
/// libvirtd afterwards so that it sees the new hook), then define domains
/// with `quorum domxml to-libvirt`. libvirt runs it with the domain XML on
/// stdin; it exits 0 for domains without quorum disks.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Operations (the second argument libvirt passes):
  prepare    start one `quorum serve` per quorum disk, return once each listens
             (exit 1 with a one-line reason otherwise: libvirt shows it)
  start      give each socket to QEMU's user and group (the DAC <seclabel>'s
             +UID:+GID label), mode 0660
  release    stop each daemon gracefully (flush, unlock) and wait for it
  reconnect  libvirtd restarted: make sure every daemon runs
  migrate    refused: live migration of quorum disks is not supported yet
  restore    the XML is passed through unchanged
  others     nothing to do
Every operation is idempotent. State: RUNTIME_DIR/DOMAIN/DEV.{xml,pid,log};
RUNTIME_DIR is --runtime-dir, else $QUORUM_RUNTIME_DIR, else /run/quorum.
Daemons run in a session of their own and outlive libvirtd restarts.

Examples:
  quorum libvirt-hook --install            # writes /etc/libvirt/hooks/qemu.d/50-quorum
  virsh dumpxml vm | quorum libvirt-hook vm prepare begin -   # what libvirt does")]
pub struct Args {
    /// The domain name libvirt passes (checked against the XML's <name>).
    #[arg(required_unless_present = "install")]
    pub domain: Option<String>,
    /// prepare, start, started, stopped, release, reconnect, migrate, restore, ...
    #[arg(required_unless_present = "install")]
    pub operation: Option<String>,
    /// libvirt's sub-operation and extra argument (unused).
    #[arg(num_args = 0..)]
    pub rest: Vec<String>,
    /// Where daemons keep their state [env: QUORUM_RUNTIME_DIR; default: /run/quorum].
    /// With --install, written into the script (libvirt cleans the environment).
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Install the hook: write HOOKS_DIR/qemu.d/50-quorum, which runs this quorum.
    #[arg(long, conflicts_with_all = ["domain", "operation"])]
    pub install: bool,
    /// With --install: libvirt's hooks folder.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/etc/libvirt/hooks",
        requires = "install"
    )]
    pub hooks_dir: PathBuf,
    /// How long `prepare` waits for a daemon to listen, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub timeout: u64,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.install {
        return install(&args.hooks_dir, args.runtime_dir.as_deref());
    }
    let op = args.operation.clone().unwrap_or_default();
    let mut input = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut input)
        .context("cannot read the domain XML on stdin")?;
    if op == "restore" {
        // libvirt uses what the hook prints as the domain XML: the same.
        std::io::stdout().write_all(&input)?;
        return Ok(ExitCode::SUCCESS);
    }
    let text = String::from_utf8(input).map_err(|_| anyhow!("domain XML is not valid UTF-8"))?;
    let dom = match libvirt::domain_disks(&text, "domain XML", Path::new("/")) {
        Ok(d) => d,
        // Not ours to judge unless it carries our namespace.
        Err(_) if !text.contains(libvirt::NAMESPACE) => return Ok(ExitCode::SUCCESS),
        Err(e) => bail!(
            "{}",
            e.to_string().lines().next().unwrap_or("invalid domain XML")
        ),
    };
    if dom.exports.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(name) = &args.domain
        && name != &dom.name
    {
        bail!(
            "libvirt names the domain '{name}' but its XML says '{}'",
            dom.name
        );
    }
    let hook = Hook {
        dir: libvirt::domain_dir(&super::domxml::runtime_dir(args.runtime_dir), &dom.name),
        timeout: Duration::from_secs(args.timeout),
    };
    match op.as_str() {
        "prepare" => hook.ensure_running(&dom)?,
        "reconnect" => {
            // A daemon started now needs the owner `start` gave the old one.
            hook.ensure_running(&dom)?;
            hook.hand_over(&dom)?;
        }
        "start" => hook.hand_over(&dom)?,
        "release" => hook.stop_all(&dom)?,
        "migrate" => bail!(
            "domain '{}' has quorum disks ({}): live migration is not supported yet",
            dom.name,
            dom.exports
                .iter()
                .map(|e| e.target.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => {}
    }
    Ok(ExitCode::SUCCESS)
}

const HOOK_SCRIPT_NAME: &str = "50-quorum";

/// `'...'` for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Write the drop-in. libvirt runs hooks with a cleaned environment, so the
/// runtime folder (--runtime-dir or QUORUM_RUNTIME_DIR) and QUORUM_STATE_DIR,
/// when set now, are written into the script.
fn install(hooks_dir: &Path, runtime_dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the quorum binary")?;
    let dir = hooks_dir.join("qemu.d");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(HOOK_SCRIPT_NAME);
    let mut env = String::new();
    let runtime = runtime_dir
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("QUORUM_RUNTIME_DIR").map(PathBuf::from));
    if let Some(r) = runtime.filter(|r| !r.as_os_str().is_empty()) {
        env.push_str(&format!(
            "QUORUM_RUNTIME_DIR={}; export QUORUM_RUNTIME_DIR\n",
            sh_quote(&r.display().to_string())
        ));
    }
    if let Some(s) = std::env::var_os("QUORUM_STATE_DIR").filter(|s| !s.is_empty()) {
        env.push_str(&format!(
            "QUORUM_STATE_DIR={}; export QUORUM_STATE_DIR\n",
            sh_quote(&s.to_string_lossy())
        ));
    }
    let script = format!(
        "#!/bin/sh\n# libvirt qemu hook for quorum disks (quorum libvirt-hook --help)\n{env}exec {} libvirt-hook \"$@\"\n",
        sh_quote(&exe.display().to_string())
    );
    std::fs::write(&path, script).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    println!("installed {}", path.display());
    println!("restart libvirtd (or virtqemud) so that it runs the new hook");
    Ok(ExitCode::SUCCESS)
}

/// Daemons of one domain, under its runtime folder (also used by
/// `quorum attach` and `quorum detach`).
pub(crate) struct Hook {
    pub(crate) dir: PathBuf,
    pub(crate) timeout: Duration,
}

impl Hook {
    fn file(&self, e: &Export, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", e.target))
    }

    /// The PID in DEV.pid, when that process is a live `quorum serve` of this disk.
    pub(crate) fn running(&self, e: &Export) -> Option<i32> {
        let text = std::fs::read_to_string(self.file(e, "pid")).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let xml = self.file(e, "xml");
        let ours = cmdline
            .split(|b| *b == 0)
            .any(|a| a == xml.as_os_str().as_encoded_bytes());
        ours.then_some(pid)
    }

    pub(crate) fn ensure_running(&self, dom: &DomainDisks) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let mut started = Vec::new();
        for e in &dom.exports {
            if self.running(e).is_some() && connects(&e.socket) {
                continue;
            }
            match self.start(e) {
                Ok(()) => started.push(e),
                Err(err) => {
                    // All or nothing: libvirt will not run the domain.
                    for s in started {
                        let _ = self.stop(s);
                    }
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    pub(crate) fn start(&self, e: &Export) -> anyhow::Result<()> {
        if let Some(pid) = self.running(e) {
            // Never orphan it by replacing its pid file.
            bail!(
                "quorum serve for {} (pid {pid}) runs but does not answer on {}",
                e.target,
                e.socket.display()
            );
        }
        let xml = self.file(e, "xml");
        let pid_file = self.file(e, "pid");
        let log = self.file(e, "log");
        std::fs::write(&xml, quorum_config::to_xml(&e.disk))
            .with_context(|| format!("cannot write {}", xml.display()))?;
        if let Some(parent) = e.socket.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let _ = std::fs::remove_file(&pid_file);
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let exe = std::env::current_exe().context("cannot find the quorum binary")?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .arg(&xml)
            .arg("--socket")
            .arg(&e.socket)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("--export")
            .arg(&e.target)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // A session of its own: libvirtd's signals and restarts never reach it.
        // SAFETY: setsid(2) is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("cannot start quorum serve")?;
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(st) = child.try_wait()? {
                let why = last_line(&log).unwrap_or_else(|| format!("exited with {st}"));
                bail!("quorum serve for {} failed: {why}", e.target);
            }
            if connects(&e.socket) && pid_file.exists() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "quorum serve for {} did not listen on {} within {} s (see {})",
                    e.target,
                    e.socket.display(),
                    self.timeout.as_secs(),
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Give every socket to QEMU's user and group, mode 0660.
    pub(crate) fn hand_over(&self, dom: &DomainDisks) -> anyhow::Result<()> {
        let owner = match &dom.dac_label {
            Some(label) => Some(parse_dac_label(label)?),
            None => None,
        };
        for e in &dom.exports {
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&e.socket, Some(uid), Some(gid)).with_context(|| {
                    format!("cannot give {} to {uid}:{gid}", e.socket.display())
                })?;
            }
            std::fs::set_permissions(&e.socket, std::fs::Permissions::from_mode(0o660))
                .with_context(|| format!("cannot set the mode of {}", e.socket.display()))?;
        }
        Ok(())
    }

    fn stop_all(&self, dom: &DomainDisks) -> anyhow::Result<()> {
        let mut first_error = None;
        for e in &dom.exports {
            if let Err(err) = self.stop(e) {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// SIGTERM, then wait until the process is gone: it flushes and unlocks
    /// the replicas and removes its socket and pid file.
    pub(crate) fn stop(&self, e: &Export) -> anyhow::Result<()> {
        let Some(pid) = self.running(e) else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + self.timeout;
        while self.running(e).is_some() && nix::sys::signal::kill(pid, None).is_ok() {
            if Instant::now() >= deadline {
                bail!(
                    "quorum serve for {} (pid {pid}) did not stop within {} s",
                    e.target,
                    self.timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

fn connects(socket: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

/// The daemon's last error line (`quorum: ...`), else its last line.
fn last_line(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let lines = || text.lines().rev().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .find(|l| l.starts_with("quorum: "))
        .map(|l| l.trim_start_matches("quorum: "))
        .or_else(|| lines().next())
        .map(str::to_string)
}

/// `+UID:+GID` (or `USER:GROUP` names) of a DAC `<seclabel>`.
fn parse_dac_label(label: &str) -> anyhow::Result<(u32, u32)> {
    let (u, g) = label
        .split_once(':')
        .ok_or_else(|| anyhow!("DAC label '{label}' is not USER:GROUP"))?;
    let uid = match u.strip_prefix('+') {
        Some(n) => n.parse().ok(),
        None => lookup_user(u),
    }
    .ok_or_else(|| anyhow!("unknown user '{u}' in DAC label '{label}'"))?;
    let gid = match g.strip_prefix('+') {
        Some(n) => n.parse().ok(),
        None => lookup_group(g),
    }
    .ok_or_else(|| anyhow!("unknown group '{g}' in DAC label '{label}'"))?;
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::parse_dac_label;

    #[test]
    fn dac_labels_take_numbers_and_names() {
        assert_eq!(parse_dac_label("+64055:+994").unwrap(), (64055, 994));
        assert_eq!(parse_dac_label("root:root").unwrap(), (0, 0));
        assert!(parse_dac_label("+1").is_err());
        assert!(parse_dac_label("no-such-user-x:+1").is_err());
    }
}
