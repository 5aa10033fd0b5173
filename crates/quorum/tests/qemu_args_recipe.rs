//! README's `quorum qemu-args` recipes, run exactly as written through
//! `bash -c` against the real qemu-storage-daemon, qemu-system-x86_64,
//! nbdinfo and qemu-io.
//!
//! Each test first checks that README.md shows the command as a ```sh block
//! of its own, then runs it in a folder holding `disk.xml` and its replicas,
//! with the quorum under test first on PATH. Daemons run in a process group
//! of their own and are stopped by its id, also when a test fails.

mod support;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Disk, Format, Options, QUORUM, qemu_io, require};

const MIB: u64 = 1 << 20;

const QSD_RECIPE: &str = "mapfile -t args < <(quorum qemu-args disk.xml --format qsd --socket vda.sock)\n\
                          qemu-storage-daemon \"${args[@]}\"";
const NBDINFO: &str = "nbdinfo 'nbd+unix:///vda?socket=vda.sock'";
const VM_RECIPE: &str = "mapfile -t args < <(quorum qemu-args disk.xml --format argv)\n\
                         qemu-system-x86_64 -display none -monitor stdio \"${args[@]}\" -device virtio-blk-pci,drive=quorum-vda";
const QEMU_IO: &str = "qemu-io \"json:$(quorum qemu-args disk.xml --json)\" -c 'read 0 1M'";

/// Panic unless README.md shows `cmd` as a ```sh block of its own.
fn assert_readme_shows(cmd: &str) {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(&readme).expect("README.md");
    let block = format!("```sh\n{cmd}\n```\n");
    assert!(
        text.contains(&block),
        "README.md does not show this block:\n{block}"
    );
}

/// Three replicas (qcow2, raw, raw) of 4 MiB, each holding 0x5a in its first MiB.
fn filled_disk() -> Disk {
    let disk = Disk::new(
        &[Format::Qcow2, Format::Raw, Format::Raw],
        4 * MIB,
        &Options::default(),
    );
    for i in 0..3 {
        disk.fill(i, 0x5a, 0, MIB);
    }
    disk
}

/// `bash -c script` in `dir`, with the quorum under test first on PATH.
fn bash(script: &str, dir: &Path) -> Command {
    let bin = Path::new(QUORUM).parent().expect("quorum's folder");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    let mut cmd = Command::new(require("bash"));
    cmd.arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("PATH", std::env::join_paths(dirs).expect("PATH"));
    cmd
}

/// A script running in a process group of its own; on drop the whole group
/// gets SIGTERM, then SIGKILL if it is still there after 10 s.
struct Group {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Group {
    fn spawn(mut cmd: Command, dir: &Path, stdin: Stdio) -> Group {
        let out = dir.join("recipe.out");
        let err = dir.join("recipe.err");
        let child = cmd
            .process_group(0)
            .stdin(stdin)
            .stdout(std::fs::File::create(&out).expect("recipe.out"))
            .stderr(std::fs::File::create(&err).expect("recipe.err"))
            .spawn()
            .expect("start bash");
        Group { child, out, err }
    }

    fn output(&self) -> String {
        format!(
            "--- stdout\n{}--- stderr\n{}",
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(&self.err).unwrap_or_default()
        )
    }

    /// Wait until the group's leader exits, at most `timeout`.
    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait (bounded) until `socket` accepts connections.
    fn wait_for_socket(&mut self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "the recipe exited ({st}) before listening:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no socket {} within 30 s:\n{}",
                socket.display(),
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the process group this test created.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        if self.wait(Duration::from_secs(10)).is_none() {
            // SAFETY: as above.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

#[test]
fn readme_qemu_storage_daemon_recipe_serves_the_disk_over_nbd() {
    for cmd in [QSD_RECIPE, NBDINFO] {
        assert_readme_shows(cmd);
    }
    require("qemu-storage-daemon");
    let disk = filled_disk();
    let dir = disk.dir.path();
    let socket = dir.join("vda.sock");

    let mut qsd = Group::spawn(bash(QSD_RECIPE, dir), dir, Stdio::null());
    qsd.wait_for_socket(&socket);
    let info = support::run(&mut bash(NBDINFO, dir));
    let uri = format!("nbd+unix:///vda?socket={}", socket.display());
    let read = qemu_io(&uri, &["read -P 0x5a 0 1M"]);
    let write = qemu_io(&uri, &["write -P 0x77 2M 64k"]);

    assert!(info.ok(), "{info}\n{}", qsd.output());
    assert!(
        info.stdout.contains("export=\"vda\":") && info.stdout.contains("export-size: 4194304"),
        "{info}"
    );
    assert!(
        read.ok()
            && read
                .stdout
                .contains("read 1048576/1048576 bytes at offset 0"),
        "{read}"
    );
    assert!(
        write.ok()
            && write
                .stdout
                .contains("wrote 65536/65536 bytes at offset 2097152"),
        "{write}"
    );
    // The export is the quorum: the write reached every replica.
    for i in 0..3 {
        let has = disk.replica_has(i, 0x77, 2 * MIB, 65536);
        assert!(
            has.ok() && !has.text().contains("fail"),
            "replica {i}: {has}"
        );
    }
    drop(qsd);
}

#[test]
fn readme_qemu_system_recipe_builds_a_vm_disk_on_the_quorum() {
    assert_readme_shows(VM_RECIPE);
    require("qemu-system-x86_64");
    let disk = filled_disk();
    let dir = disk.dir.path();

    let mut vm = Group::spawn(bash(VM_RECIPE, dir), dir, Stdio::piped());
    let mut stdin = vm.child.stdin.take().expect("stdin");
    stdin
        .write_all(b"info block\nqemu-io quorum-vda \"read -P 0x5a 0 1M\"\nquit\n")
        .expect("monitor commands");
    drop(stdin);
    let status = vm.wait(Duration::from_secs(120));
    let out = vm.output();

    assert!(
        status.is_some_and(|s| s.success()),
        "the VM did not quit cleanly ({status:?}):\n{out}"
    );
    assert!(
        out.contains("quorum-vda: json:") && out.contains("\"driver\": \"quorum\""),
        "info block shows the quorum node:\n{out}"
    );
    assert!(
        out.contains("Attached to:      /machine/peripheral-anon/device[0]/virtio-backend"),
        "the virtio disk uses it:\n{out}"
    );
    assert!(
        out.contains("read 1048576/1048576 bytes at offset 0")
            && !out.contains("Pattern verification failed"),
        "a read through QEMU's quorum sees the replicas' data:\n{out}"
    );
}

#[test]
fn readme_qemu_io_recipe_reads_through_qemus_quorum() {
    assert_readme_shows(QEMU_IO);
    require("qemu-io");
    let disk = filled_disk();

    let out = support::run(&mut bash(QEMU_IO, disk.dir.path()));

    assert!(
        out.ok()
            && out
                .stdout
                .contains("read 1048576/1048576 bytes at offset 0"),
        "{out}"
    );
}
