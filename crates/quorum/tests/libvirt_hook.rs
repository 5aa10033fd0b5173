//! `quorum libvirt-hook`, run as libvirt runs it: `HOOK DOMAIN OPERATION
//! SUB-OP EXTRA` with a recorded live domain XML (libvirt 9's `dumpxml` of
//! a running domain, testdata/libvirt/hook-domain.xml) on stdin, a temp
//! runtime dir, and real `quorum serve` daemons read through by qemu-io.
//!
//! Every daemon a test starts is killed by the PID in its pid file when the
//! test ends, also when it fails.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Disk, Options, QUORUM, qemu_io, state_dir};

const MIB: u64 = 1 << 20;

/// Three raw replicas holding 0x5a, a runtime dir, and the recorded domain
/// XML pointing at both.
struct Fixture {
    disk: Disk,
    run: tempfile::TempDir,
    xml: String,
    /// uid and gid the DAC label names.
    owner: (u32, u32),
}

impl Fixture {
    fn new() -> Fixture {
        let disk = Disk::raw_filled(3, MIB, 0x5a, &Options::default());
        let run = tempfile::Builder::new()
            .prefix("qh")
            .tempdir_in("/tmp")
            .expect("runtime dir");
        // As root, hand the socket to someone else to see it change hands.
        // SAFETY: geteuid/getegid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let owner = if uid == 0 { (65534, 65534) } else { (uid, gid) };
        let recorded = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../quorum-config/testdata/libvirt/hook-domain.xml"),
        )
        .expect("recorded domain XML");
        let xml = recorded
            .replace(
                "@DIR@",
                &disk.path(0).parent().expect("dir").display().to_string(),
            )
            .replace("@RUN@", &run.path().display().to_string())
            .replace("@LABEL@", &format!("+{}:+{}", owner.0, owner.1));
        Fixture {
            disk,
            run,
            xml,
            owner,
        }
    }

    fn dir(&self) -> PathBuf {
        self.run.path().join("hooked")
    }

    fn socket(&self) -> PathBuf {
        self.dir().join("vda.sock")
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///vda?socket={}", self.socket().display())
    }

    /// `quorum libvirt-hook hooked OP begin -` with `xml` on stdin.
    fn hook_with(&self, op: &str, xml: &str) -> support::Output {
        self.hook_args(&[op], xml)
    }

    /// `quorum libvirt-hook hooked OP begin - EXTRA...`, `xml` on stdin.
    fn hook_args(&self, op_and_extra: &[&str], xml: &str) -> support::Output {
        let (op, extra) = op_and_extra.split_first().expect("an operation");
        let mut child = Command::new(QUORUM)
            .env("QUORUM_STATE_DIR", state_dir())
            .env("QUORUM_RUNTIME_DIR", self.run.path())
            .args(["libvirt-hook", "hooked", op, "begin", "-"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start quorum libvirt-hook");
        let mut stdin = child.stdin.take().expect("stdin");
        let input = xml.to_string();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
        let mut out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        // The hook's own output must close when it exits: libvirt waits for
        // EOF, so a daemon holding these pipes would hang libvirt.
        let t_out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let t_err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + Duration::from_secs(90);
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("libvirt-hook {op} did not finish within 90 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        writer.join().expect("writer");
        let bounded = |t: std::thread::JoinHandle<String>| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !t.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "the hook's output stayed open after it exited (a daemon holds it)"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            t.join().expect("reader")
        };
        support::Output {
            code: status.code(),
            stdout: bounded(t_out),
            stderr: bounded(t_err),
        }
    }

    fn hook(&self, op: &str) -> support::Output {
        self.hook_with(op, &self.xml)
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir().join("vda.pid"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("vda.log")).unwrap_or_default()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            kill(pid, libc::SIGKILL);
        }
    }
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a PID the test started through the hook.
    unsafe { libc::kill(pid, sig) };
}

fn alive(pid: i32) -> bool {
    // A zombie is gone for our purpose: it holds no files or locks.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

#[test]
fn prepare_starts_a_daemon_that_serves_the_voted_disk() {
    let fx = Fixture::new();
    fx.disk.poke_raw(2, 0, &[0xff; 4096]);

    let out = fx.hook("prepare");

    assert!(out.ok(), "{out}\n{}", fx.log());
    assert!(out.stderr.is_empty(), "{out}");
    let pid = fx.pid().expect("pid file");
    assert!(alive(pid));
    // Replica 2 is wrong at 0..4K: the vote gives the other two.
    let read = qemu_io(&fx.uri(), &["read -P 0x5a 0 4096"]);
    assert!(
        read.ok() && !read.text().contains("verification failed"),
        "{read}"
    );
    let extracted = std::fs::read_to_string(fx.dir().join("vda.xml")).unwrap();
    assert!(
        extracted.starts_with("<disk type='quorum' device='disk'>"),
        "{extracted}"
    );
    assert!(extracted.contains(&fx.disk.path(2).display().to_string()));
}

#[test]
fn prepare_twice_keeps_the_running_daemon() {
    let fx = Fixture::new();
    assert!(fx.hook("prepare").ok(), "{}", fx.log());
    let first = fx.pid().expect("pid");

    let again = fx.hook("prepare");

    assert!(again.ok(), "{again}");
    assert_eq!(fx.pid(), Some(first));
    assert!(alive(first));
}

#[test]
fn prepare_never_orphans_a_daemon_whose_socket_is_gone() {
    let fx = Fixture::new();
    assert!(fx.hook("prepare").ok(), "{}", fx.log());
    let pid = fx.pid().expect("pid");
    std::fs::remove_file(fx.socket()).unwrap();

    let again = fx.hook("prepare");

    assert_eq!(again.code, Some(1), "{again}");
    assert!(
        again.stderr.contains(&format!(
            "quorum serve for vda (pid {pid}) runs but does not answer"
        )),
        "{again}"
    );
    assert_eq!(fx.pid(), Some(pid), "its pid file is kept");
    assert!(alive(pid));
}

#[test]
fn start_hands_the_socket_to_qemus_user_and_group_mode_0660() {
    let fx = Fixture::new();
    assert!(fx.hook("prepare").ok(), "{}", fx.log());

    let out = fx.hook("start");

    assert!(out.ok(), "{out}");
    let m = std::fs::metadata(fx.socket()).expect("socket");
    assert_eq!((m.uid(), m.gid()), fx.owner);
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
}

#[test]
fn release_stops_the_daemon_gracefully_and_is_idempotent() {
    let fx = Fixture::new();
    assert!(fx.hook("prepare").ok(), "{}", fx.log());
    let pid = fx.pid().expect("pid");

    let out = fx.hook("release");

    assert!(out.ok(), "{out}");
    assert!(!alive(pid), "daemon {pid} still runs after release");
    assert!(!fx.socket().exists(), "the daemon removes its socket");
    assert!(fx.log().contains("stopped cleanly"), "{}", fx.log());
    let again = fx.hook("release");
    assert!(again.ok(), "{again}");
}

#[test]
fn release_waits_for_the_daemon_to_exit() {
    let fx = Fixture::new();
    assert!(fx.hook("prepare").ok(), "{}", fx.log());
    let pid = fx.pid().expect("pid");
    // Stopped, the daemon cannot act on SIGTERM: a hook that waits for it
    // to exit must give up, and say so.
    kill(pid, libc::SIGSTOP);

    let stuck = fx.hook_args(&["release", "--timeout", "1"], &fx.xml);
    kill(pid, libc::SIGCONT);
    let done = fx.hook("release");

    assert_eq!(stuck.code, Some(1), "{stuck}");
    assert!(
        stuck.stderr.contains(&format!(
            "quorum serve for vda (pid {pid}) did not stop within 1 s"
        )),
        "{stuck}"
    );
    assert!(done.ok(), "{done}");
    assert!(!alive(pid));
    assert!(fx.log().contains("stopped cleanly"), "{}", fx.log());
}

#[test]
fn reconnect_restarts_a_daemon_that_died_and_hands_it_over() {
    let fx = Fixture::new();
    assert!(fx.hook("prepare").ok(), "{}", fx.log());
    let old = fx.pid().expect("pid");
    kill(old, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(old) {
        assert!(Instant::now() < deadline, "SIGKILL did not end {old}");
        std::thread::sleep(Duration::from_millis(10));
    }

    let out = fx.hook("reconnect");

    assert!(out.ok(), "{out}\n{}", fx.log());
    let new = fx.pid().expect("pid");
    assert_ne!(new, old);
    assert!(alive(new));
    let m = std::fs::metadata(fx.socket()).expect("socket");
    assert_eq!((m.uid(), m.gid()), fx.owner);
    assert!(qemu_io(&fx.uri(), &["read -P 0x5a 0 4096"]).ok());
}

#[test]
fn migrate_is_refused_with_one_clear_line() {
    let fx = Fixture::new();

    let out = fx.hook("migrate");

    assert_eq!(out.code, Some(1), "{out}");
    assert_eq!(
        out.stderr,
        "quorum: domain 'hooked' has quorum disks (vda): live migration is not supported yet\n"
    );
}

#[test]
fn restore_passes_the_xml_through() {
    let fx = Fixture::new();

    let out = fx.hook("restore");

    assert!(out.ok(), "{out}");
    assert_eq!(out.stdout, fx.xml);
}

#[test]
fn a_domain_without_quorum_disks_is_left_alone() {
    let fx = Fixture::new();
    let plain = "<domain type='qemu'><name>hooked</name><devices/></domain>";

    for op in ["prepare", "start", "release", "migrate"] {
        let out = fx.hook_with(op, plain);
        assert!(out.ok() && out.text().is_empty(), "{op}: {out}");
    }
    assert!(!fx.dir().exists(), "nothing created");
}

#[test]
fn prepare_that_cannot_listen_fails_with_one_line_and_leaves_no_daemon() {
    let fx = Fixture::new();
    // The socket's folder is a regular file: the daemon cannot bind.
    std::fs::create_dir_all(fx.run.path()).unwrap();
    let blocker = fx.run.path().join("blocker");
    std::fs::write(&blocker, "").unwrap();
    let xml = fx.xml.replace(
        &fx.socket().display().to_string(),
        &blocker.join("vda.sock").display().to_string(),
    );

    let out = fx.hook_with("prepare", &xml);

    assert_eq!(out.code, Some(1), "{out}");
    assert_eq!(out.stderr.lines().count(), 1, "{out}");
    assert!(out.stderr.starts_with("quorum: cannot create "), "{out}");
    assert!(fx.pid().is_none_or(|p| !alive(p)));
}

#[test]
fn a_daemon_that_exits_makes_prepare_fail_with_its_reason() {
    let fx = Fixture::new();
    // Replicas of different sizes: quorum serve refuses to start.
    std::fs::OpenOptions::new()
        .write(true)
        .open(fx.disk.path(0))
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();

    let out = fx.hook("prepare");

    assert_eq!(out.code, Some(1), "{out}");
    assert_eq!(out.stderr.lines().count(), 1, "{out}");
    assert!(
        out.stderr
            .starts_with("quorum: quorum serve for vda failed: "),
        "{out}"
    );
    assert!(fx.pid().is_none_or(|p| !alive(p)));
}

#[test]
fn install_writes_a_drop_in_that_runs_this_quorum() {
    let hooks = tempfile::tempdir().unwrap();
    let fx = Fixture::new();

    let out = support::quorum([
        "libvirt-hook".as_ref(),
        "--install".as_ref(),
        "--hooks-dir".as_ref(),
        hooks.path().as_os_str(),
    ]);

    assert!(out.ok(), "{out}");
    let script = hooks.path().join("qemu.d/50-quorum");
    let mode = std::fs::metadata(&script).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    // libvirt runs it as `50-quorum DOMAIN restore begin -`, XML on stdin.
    let mut child = Command::new(&script)
        .args(["hooked", "restore", "begin", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the installed hook");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(fx.xml.as_bytes())
        .unwrap();
    let mut echoed = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut echoed)
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(echoed, fx.xml);
}
