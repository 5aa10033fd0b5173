//! Malformed frames, oversized lengths and vanishing clients against the
//! real `quorum serve` daemon (3 raw replicas, threshold 2). The same checks
//! run against the in-memory backend in `src/server/tests.rs`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

mod common;
use common::nbd_raw::{checks, wait_for_socket};

const XML: &str = "<disk type='quorum' device='disk'>
  <driver name='qemu' type='quorum'/>
  <threshold value='2'/>
  <backingStore type='file'><format type='raw'/><source file='r1.raw'/></backingStore>
  <backingStore type='file'><format type='raw'/><source file='r2.raw'/></backingStore>
  <backingStore type='file'><format type='raw'/><source file='r3.raw'/></backingStore>
  <target dev='vda' bus='virtio'/>
</disk>
";

/// A `quorum serve` on a unix socket in a temp dir; killed by PID on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let xml = dir.path().join("disk.xml");
        std::fs::write(&xml, XML).unwrap();
        let created = Command::new(env!("CARGO_BIN_EXE_quorum"))
            .arg("create")
            .arg(&xml)
            .args(["--size", "4M"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(created.success(), "quorum create failed");
        let socket = dir.path().join("nbd.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_quorum"))
            .arg("serve")
            .arg(&xml)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("start quorum serve");
        wait_for_socket(&socket);
        Self {
            child,
            socket,
            _dir: dir,
        }
    }

    fn path(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn bad_magic_disconnects_only_that_client() {
    let d = Daemon::start(&[]);
    checks::bad_magic_disconnects_only_that_client(d.path(), "vda");
}

#[test]
fn truncated_header_then_close_leaves_server_serving() {
    let d = Daemon::start(&[]);
    checks::truncated_header_then_close_leaves_server_serving(d.path(), "vda");
}

#[test]
fn oversized_write_is_refused_without_its_payload() {
    let d = Daemon::start(&[]);
    checks::oversized_write_is_refused_without_its_payload(d.path(), "vda");
}

#[test]
fn oversized_read_fails_cleanly() {
    let d = Daemon::start(&[]);
    checks::oversized_read_fails_cleanly(d.path(), "vda");
}

#[test]
fn read_past_end_is_einval() {
    let d = Daemon::start(&[]);
    checks::read_past_end_is_einval(d.path(), "vda");
}

#[test]
fn write_past_end_is_einval() {
    let d = Daemon::start(&[]);
    checks::write_past_end_is_einval(d.path(), "vda");
}

#[test]
fn write_to_read_only_export_is_eperm() {
    let d = Daemon::start(&["--read-only"]);
    checks::write_to_read_only_export_is_eperm(d.path(), "vda");
}

#[test]
fn unknown_command_is_einval() {
    let d = Daemon::start(&[]);
    checks::unknown_command_is_einval(d.path(), "vda");
}

#[test]
fn disconnect_mid_write_leaves_server_serving() {
    let d = Daemon::start(&[]);
    checks::disconnect_mid_write_leaves_server_serving(d.path(), "vda");
}

#[test]
fn pipelined_requests_all_complete() {
    let d = Daemon::start(&[]);
    checks::pipelined_requests_all_complete(d.path(), "vda");
}
