//! `quorum attach` / `quorum detach`: a quorum disk into or out of a
//! defined (or running) domain. libvirt runs no hook on hotplug, so these
//! start and stop the daemon themselves, keep the domain's metadata in step
//! (`virsh metadata --set`), and call `virsh attach-device` / `detach-disk`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use quorum_config::libvirt::{self, Export};

use super::libvirt_hook::Hook;

/// Where to apply a change, as virsh's --live / --config.
#[derive(Debug, clap::Args)]
pub struct Scope {
    /// Change the running domain (default when it runs).
    #[arg(long)]
    pub live: bool,
    /// Change the persistent definition (default when it does not run).
    #[arg(long)]
    pub config: bool,
    /// libvirt connection URI, passed to virsh as -c.
    #[arg(long, short = 'c', value_name = "URI")]
    pub connect: Option<String>,
    /// Sockets go to DIR/DOMAIN/DEV.sock [env: QUORUM_RUNTIME_DIR; default: /run/quorum].
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
}

/// Attach a quorum disk (a `<disk type='quorum'>` file) to a domain.
///
/// With --live (the default for a running domain) the daemon is started
/// first and its socket handed to QEMU's user, then the disk's metadata is
/// added and `virsh attach-device` runs; on failure everything is undone.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Examples:
  quorum attach vm data.xml --live --config   # now and after the next start
  quorum attach vm data.xml --config          # from the next start on
  quorum detach vm vdb --config")]
pub struct AttachArgs {
    /// The domain's name.
    pub domain: String,
    /// The `<disk type='quorum'>` to attach (`-`: standard input).
    pub file: PathBuf,
    #[command(flatten)]
    pub scope: Scope,
}

/// Detach a quorum disk from a domain: `virsh detach-disk`, then its
/// metadata, then (with --live) its daemon.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The domain's name.
    pub domain: String,
    /// The disk's target dev (e.g. vdb).
    pub target: String,
    #[command(flatten)]
    pub scope: Scope,
}

struct Virsh<'a> {
    uri: Option<&'a str>,
}

impl Virsh<'_> {
    fn cmd(&self) -> Command {
        let mut c = Command::new("virsh");
        c.arg("-q");
        if let Some(u) = self.uri {
            c.arg("-c").arg(u);
        }
        c
    }

    /// Run with `input` on stdin; stdout on success, virsh's error otherwise.
    fn run(&self, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
        let mut c = self.cmd();
        c.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .context("cannot run virsh (Debian: apt-get install libvirt-clients)")?;
        if let Some(text) = input {
            let mut stdin = child.stdin.take().expect("piped stdin");
            let _ = stdin.write_all(text.as_bytes());
        }
        let out = child.wait_with_output().context("waiting for virsh")?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            bail!(
                "virsh {}: {}",
                args.first().copied().unwrap_or(""),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        }
    }
}

/// The virsh flags to apply with, and whether the running domain changes.
fn flags(v: &Virsh<'_>, domain: &str, scope: &Scope) -> anyhow::Result<(Vec<&'static str>, bool)> {
    let state = v.run(&["domstate", domain], None)?;
    let running = matches!(state.trim(), "running" | "paused" | "blocked");
    let mut f = Vec::new();
    let live = scope.live || (!scope.config && running);
    if live {
        if !running {
            bail!("domain '{domain}' is not running: use --config");
        }
        f.push("--live");
    }
    if scope.config || !live {
        f.push("--config");
    }
    Ok((f, live))
}

/// Our metadata in one scope (`--live` or `--config`), if any.
fn metadata(v: &Virsh<'_>, domain: &str, scope: &str) -> Option<String> {
    v.run(&["metadata", domain, libvirt::NAMESPACE, scope], None)
        .ok()
        .filter(|s| !s.trim().is_empty())
}

fn set_metadata(v: &Virsh<'_>, domain: &str, scope: &str, xml: Option<&str>) -> anyhow::Result<()> {
    let ns = libvirt::NAMESPACE;
    match xml {
        Some(x) => v.run(
            &[
                "metadata",
                domain,
                ns,
                "--key",
                libvirt::PREFIX,
                "--set",
                x,
                scope,
            ],
            None,
        ),
        None => v.run(&["metadata", domain, ns, "--remove", scope], None),
    }
    .map(|_| ())
}

fn hook_for(scope: &Scope, domain: &str) -> Hook {
    Hook {
        dir: libvirt::domain_dir(
            &super::domxml::runtime_dir(scope.runtime_dir.clone()),
            domain,
        ),
        timeout: Duration::from_secs(60),
    }
}

pub fn attach(args: AttachArgs) -> anyhow::Result<ExitCode> {
    let v = Virsh {
        uri: args.scope.connect.as_deref(),
    };
    let (text, label, dir) = super::domxml::read_input(&args.file)?;
    let runtime = super::domxml::runtime_dir(args.scope.runtime_dir.clone());
    let parts = match libvirt::attach_parts(&text, &label, &dir, &runtime, &args.domain, true) {
        Ok(p) => p,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::from(crate::exit::ERROR));
        }
    };
    let (f, live) = flags(&v, &args.domain, &args.scope)?;
    let hook = hook_for(&args.scope, &args.domain);
    // Every check before anything changes: a refused attach leaves the
    // domain, its metadata and any running daemon as they were.
    let mut edits = Vec::new();
    for scope in &f {
        let cur = metadata(&v, &args.domain, scope);
        let new = libvirt::edit_metadata(cur.as_deref(), Some(&parts.export), None)
            .map_err(anyhow::Error::msg)?;
        edits.push((*scope, cur, new));
    }
    if live && let Some(pid) = hook.running(&parts.export) {
        bail!(
            "a quorum serve for {} already runs (pid {pid})",
            parts.export.target
        );
    }
    let mut undo: Vec<(&str, Option<String>)> = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        if live {
            std::fs::create_dir_all(&hook.dir)
                .with_context(|| format!("cannot create {}", hook.dir.display()))?;
            hook.start(&parts.export)?;
            let xml = v.run(&["dumpxml", &args.domain], None)?;
            let mut dom = libvirt::domain_disks(&xml, "live domain", std::path::Path::new("/"))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            dom.exports = vec![parts.export.clone()];
            hook.hand_over(&dom)?;
        }
        for (scope, cur, new) in &edits {
            set_metadata(&v, &args.domain, scope, new.as_deref())?;
            undo.push((scope, cur.clone()));
        }
        let mut a = vec!["attach-device", args.domain.as_str(), "/dev/stdin"];
        a.extend(f.iter().copied());
        v.run(&a, Some(&parts.frontend))?;
        Ok(())
    })();
    if let Err(e) = result {
        for (scope, old) in undo {
            let _ = set_metadata(&v, &args.domain, scope, old.as_deref());
        }
        if live {
            let _ = hook.stop(&parts.export);
        }
        return Err(e);
    }
    println!(
        "attached quorum disk {} to {} ({})",
        parts.export.target,
        args.domain,
        f.join(" ")
    );
    Ok(ExitCode::SUCCESS)
}

pub fn detach(args: DetachArgs) -> anyhow::Result<ExitCode> {
    let v = Virsh {
        uri: args.scope.connect.as_deref(),
    };
    let (f, live) = flags(&v, &args.domain, &args.scope)?;
    // The export, for its daemon, before the metadata loses it.
    let mut export: Option<Export> = None;
    let mut edits = Vec::new();
    for scope in &f {
        let cur = metadata(&v, &args.domain, scope);
        let new = libvirt::edit_metadata(cur.as_deref(), None, Some(&args.target))
            .map_err(anyhow::Error::msg)?;
        if *scope == "--live"
            && let Some(c) = &cur
        {
            let l = quorum_config::parse_str_full(
                c,
                "quorum metadata",
                std::path::Path::new("/"),
                Some(&args.target),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            export = Some(Export {
                target: args.target.clone(),
                socket: l.socket.unwrap_or_default(),
                disk: l.disk,
            });
        }
        edits.push((*scope, new));
    }
    let mut a = vec!["detach-disk", args.domain.as_str(), args.target.as_str()];
    a.extend(f.iter().copied());
    v.run(&a, None)?;
    for (scope, new) in edits {
        set_metadata(&v, &args.domain, scope, new.as_deref())?;
    }
    if live && let Some(e) = export {
        hook_for(&args.scope, &args.domain).stop(&e)?;
    }
    println!(
        "detached quorum disk {} from {} ({})",
        args.target,
        args.domain,
        f.join(" ")
    );
    Ok(ExitCode::SUCCESS)
}
