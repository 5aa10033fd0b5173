//! `quorum define`: `quorum domxml to-libvirt` + `virsh define --validate`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::Context;
use quorum_config::libvirt;

/// Define a domain written with proposal-style `<disk type='quorum'>` disks in libvirt.
///
/// Converts it as `quorum domxml to-libvirt` does (NBD frontends on
/// RUNTIME_DIR/DOMAIN/DEV.sock, the quorum disks in <metadata>) and hands
/// the result to `virsh define --validate`. Always --validate: a plain
/// define silently drops what libvirt does not know. The libvirt hook
/// (`quorum libvirt-hook --install`) then starts and stops the daemons.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Examples:
  quorum define vm.xml                       # the default libvirt connection
  quorum define vm.xml --connect qemu:///system
  virsh start vm                             # the hook starts quorum serve first

To edit a defined domain: virsh dumpxml vm | quorum domxml from-libvirt - > vm.xml,
edit, then quorum define vm.xml again (virsh undefine is not needed).")]
pub struct Args {
    /// The domain XML (`-`: standard input).
    pub file: PathBuf,
    /// libvirt connection URI, passed to virsh as -c (e.g. qemu:///system).
    #[arg(long, short = 'c', value_name = "URI")]
    pub connect: Option<String>,
    /// Sockets go to DIR/DOMAIN-NAME/DEV.sock [env: QUORUM_RUNTIME_DIR; default: /run/quorum].
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (text, label, dir) = super::domxml::read_input(&args.file)?;
    let runtime = super::domxml::runtime_dir(args.runtime_dir);
    let xml = match libvirt::to_libvirt(&text, &label, &dir, &runtime, true) {
        Ok(x) => x,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::from(crate::exit::ERROR));
        }
    };
    // virsh reads the file whole; the converted domain comes down a pipe.
    let mut cmd = Command::new("virsh");
    if let Some(uri) = &args.connect {
        cmd.arg("-c").arg(uri);
    }
    cmd.args(["define", "--validate", "/dev/stdin"])
        .stdin(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("cannot run virsh (Debian: apt-get install libvirt-clients)")?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    // virsh may exit before reading it all (a bad URI): then its status tells.
    let _ = stdin.write_all(xml.as_bytes());
    drop(stdin);
    let status = child.wait().context("waiting for virsh")?;
    if status.success() {
        Ok(ExitCode::SUCCESS)
    } else {
        anyhow::bail!("virsh define --validate refused the converted domain ({status})")
    }
}
