//! `quorum domxml`: convert a domain between the proposal's
//! `<disk type='quorum'>` and what stock libvirt accepts.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use quorum_config::libvirt;

/// Convert a domain between proposal-style quorum disks and stock libvirt.
///
/// libvirt refuses `<disk type='quorum'>`. `to-libvirt` turns each such disk
/// into an ordinary NBD disk on a unix socket (served by `quorum serve`,
/// started by `quorum libvirt-hook`) and keeps the quorum disk in the
/// domain's `<metadata>`; `from-libvirt` puts it back, for reading and editing.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
to-libvirt writes, for each <disk type='quorum'> under <devices>:
  <disk type='network' device='disk'>
    <driver name='qemu' type='raw'/>
    <source protocol='nbd' name='vda'>
      <host transport='unix' socket='/run/quorum/DOMAIN/vda.sock'/>
    </source>
    <target dev='vda' bus='virtio'/>
    <alias name='ua-quorum-vda'/>
  </disk>
keeping the target, serial, readonly, shareable, boot order, address and the
guest-side driver options (cache, io, discard, ...), and adds to <metadata>:
  <quorum:disks xmlns:quorum='https://quorum.dev/xmlns/libvirt/1'>
    <quorum:export target='vda' socket='/run/quorum/DOMAIN/vda.sock'>
      <quorum:disk type='quorum' device='disk'>...canonical disk...</quorum:disk>
    </quorum:export>
  </quorum:disks>
libvirt keeps that element verbatim, and every quorum command reads it
(`virsh dumpxml vm | quorum validate - --target vda`). The rest of the
document is kept byte for byte. Relative image paths become absolute.

from-libvirt is the inverse: from-libvirt(to-libvirt(x)) holds every quorum
disk as `quorum dumpxml` prints it.

Examples:
  quorum domxml to-libvirt vm.xml > vm-libvirt.xml
  virsh define --validate vm-libvirt.xml
  virsh dumpxml vm | quorum domxml from-libvirt - > vm.xml")]
pub struct Args {
    #[command(subcommand)]
    pub direction: Direction,
}

/// Which way to convert.
#[derive(Debug, clap::Subcommand)]
pub enum Direction {
    /// Proposal-style domain -> domain stock libvirt accepts (NBD frontends + metadata).
    ToLibvirt(ToArgs),
    /// Domain with quorum metadata -> proposal-style domain.
    FromLibvirt(FromArgs),
}

#[derive(Debug, clap::Args)]
pub struct ToArgs {
    /// The domain XML (`-`: standard input).
    pub file: PathBuf,
    /// Sockets go to DIR/DOMAIN-NAME/DEV.sock [env: QUORUM_RUNTIME_DIR; default: /run/quorum].
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct FromArgs {
    /// The domain XML (`-`: standard input).
    pub file: PathBuf,
}

/// `--runtime-dir`, else `$QUORUM_RUNTIME_DIR`, else `/run/quorum`.
pub fn runtime_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| {
        std::env::var_os("QUORUM_RUNTIME_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| PathBuf::from(libvirt::DEFAULT_RUNTIME_DIR))
}

/// The text of `file` (or stdin for `-`), its error label and its folder.
pub fn read_input(file: &Path) -> anyhow::Result<(String, String, PathBuf)> {
    let (bytes, label, dir) = if file.as_os_str() == "-" {
        let mut b = Vec::new();
        std::io::stdin().lock().read_to_end(&mut b)?;
        (b, super::util::STDIN_LABEL.to_string(), PathBuf::from("."))
    } else {
        let b = std::fs::read(file)
            .map_err(|e| anyhow::anyhow!("{}: cannot read file: {e}", file.display()))?;
        let dir = match file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (b, file.display().to_string(), dir)
    };
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{label}: XML error: document is not valid UTF-8"))?;
    Ok((text, label, dir))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let result = match args.direction {
        Direction::ToLibvirt(a) => {
            let (text, label, dir) = read_input(&a.file)?;
            libvirt::to_libvirt(&text, &label, &dir, &runtime_dir(a.runtime_dir), true)
        }
        Direction::FromLibvirt(a) => {
            let (text, label, dir) = read_input(&a.file)?;
            libvirt::from_libvirt(&text, &label, &dir)
        }
    };
    match result {
        Ok(xml) => {
            print!("{xml}");
            if !xml.ends_with('\n') {
                println!();
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprintln!("{errors}");
            Ok(ExitCode::from(crate::exit::ERROR))
        }
    }
}
