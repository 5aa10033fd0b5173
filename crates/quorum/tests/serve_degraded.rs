//! Degraded operation against real peers: `quorum serve` and `quorum check`
//! with a replica missing at start, a remote replica that hangs (nbdkit
//! `pause` filter) or fails every read (nbdkit `error` filter), observed
//! through qemu-io, nbdkit's `log` filter and the daemon's own log.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Daemon, Disk, Format, Options, create_image, qemu_io, quorum, require};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;
const FILL: u8 = 0x5a;

/// nbdkit serving a raw file on a unix socket, killed by PID on drop.
struct Nbdkit {
    child: Child,
    socket: PathBuf,
    /// nbdkit's `log` filter output (every request as it arrives).
    log: PathBuf,
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nbdkit {
    /// `nbdkit --filter=log FILTERS file FILE ARGS`, ready when it returns.
    fn start(dir: &Path, file: &Path, filters: &[&str], args: &[String]) -> Nbdkit {
        let socket = dir.join("remote.sock");
        let pid = dir.join("nbdkit.pid");
        let log = dir.join("nbdkit.log");
        let mut cmd = Command::new(require("nbdkit"));
        cmd.args(["-f", "--exit-with-parent", "-U"])
            .arg(&socket)
            .arg("-P")
            .arg(&pid)
            .arg("--filter=log");
        for f in filters {
            cmd.arg(format!("--filter={f}"));
        }
        let child = cmd
            .arg("file")
            .arg(file)
            .arg(format!("logfile={}", log.display()))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nbdkit");
        let kit = Nbdkit { child, socket, log };
        wait_for("nbdkit's pid file", || {
            std::fs::metadata(&pid).is_ok_and(|m| m.len() > 0)
        });
        kit
    }

    /// Read requests that reached nbdkit so far.
    fn reads(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Read id=") && l.contains("offset="))
            .count()
    }
}

/// Poll `cond` every 20 ms for at most 20 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two local raw replicas filled with FILL, plus a third behind nbdkit.
fn with_remote(filters: &[&str], args: &[String]) -> (Disk, Nbdkit, PathBuf) {
    let disk = Disk::raw_filled(2, SIZE, FILL, &Options::default());
    let remote = disk.file("remote.raw");
    create_image(&remote, Format::Raw, SIZE, None);
    std::fs::write(&remote, vec![FILL; SIZE as usize]).expect("fill remote");
    let kit = Nbdkit::start(disk.dir.path(), &remote, filters, args);
    let nbd = format!(
        "  <backingStore type='network'>\n    <format type='raw'/>\n    <source protocol='nbd'>\n      <host transport='unix' socket='{}'/>\n    </source>\n  </backingStore>\n",
        kit.socket.display()
    );
    let xml = disk
        .xml_text(&Options::default())
        .replace("  <target ", &format!("{nbd}  <target "));
    std::fs::write(&disk.xml, xml).expect("write xml");
    (disk, kit, remote)
}

/// Send a pause-filter command and wait for its acknowledgement.
fn pause_control(socket: &Path, cmd: u8) {
    let mut s = UnixStream::connect(socket).expect("connect to pause control");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&[cmd]).expect("send pause command");
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).expect("pause filter ack");
    assert_eq!(ack[0], cmd.to_ascii_uppercase());
}

fn reads(n: u64) -> Vec<String> {
    (0..n)
        .map(|i| format!("read -P 0x5a {} 4k", 65536 + i * 4096))
        .collect()
}

fn ok_reads(out: &support::Output) -> usize {
    out.stdout
        .lines()
        .filter(|l| l.starts_with("read 4096/4096 bytes"))
        .count()
}

#[test]
fn serve_starts_with_a_replica_missing_and_says_which() {
    let disk = Disk::raw_filled(3, SIZE, FILL, &Options::default());
    std::fs::remove_file(disk.path(1)).unwrap();
    let d = Daemon::start(&disk, &[]);

    let read = qemu_io(&d.uri, &["read -P 0x5a 0 1M"]);
    let write = qemu_io(&d.uri, &["write -P 0x11 1M 64k", "read -P 0x11 1M 64k"]);
    let out = std::fs::read_to_string(disk.dir.path().join("serve.out")).unwrap();

    assert!(read.ok() && !read.text().contains("fail"), "{read}");
    assert!(write.ok() && !write.text().contains("fail"), "{write}");
    assert!(
        out.contains("DEGRADED: 1 of 3 replicas missing")
            && out.contains("missing: replica-1: ")
            && out.contains(&disk.path(1).display().to_string()),
        "{out}"
    );
    assert!(
        d.log_text()
            .contains("replica replica-1 could not be opened"),
        "{}",
        d.log_text()
    );
}

#[test]
fn serve_refuses_to_start_below_the_threshold_naming_every_missing_replica() {
    let disk = Disk::raw_filled(3, SIZE, FILL, &Options::default());
    std::fs::remove_file(disk.path(0)).unwrap();
    std::fs::remove_file(disk.path(2)).unwrap();
    let sock = disk.file("nbd.sock");

    let out = quorum([
        "serve".as_ref(),
        disk.xml.as_os_str(),
        "--socket".as_ref(),
        sock.as_os_str(),
    ]);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("only 1 of 3 replicas can be used, but threshold 2 needs 2")
            && out.stderr.contains(&disk.path(0).display().to_string())
            && out.stderr.contains(&disk.path(2).display().to_string()),
        "{out}"
    );
}

#[test]
fn check_runs_without_a_missing_replica_and_reports_it() {
    let disk = Disk::raw_filled(3, SIZE, FILL, &Options::default());
    std::fs::remove_file(disk.path(2)).unwrap();

    let out = quorum(["check".as_ref(), disk.xml.as_os_str(), "--json".as_ref()]);

    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("json report");
    assert_eq!(report["missing"][0]["replica"], 2, "{out}");
    assert!(
        out.stderr
            .contains("replica-2 could not be opened, checking without it"),
        "{out}"
    );
}

#[test]
fn hung_replica_costs_its_timeout_once_then_is_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("pause.ctl");
    let (disk, kit, _) = with_remote(
        &["pause"],
        &[format!("pause-control={}", control.display())],
    );
    // No record: the first start's full comparison would read the hung
    // replica too, and this test counts what reaches it.
    let d = Daemon::start(&disk, &["--replica-timeout", "1", "--no-tracking"]);
    pause_control(&control, b'p');
    let before = kit.reads();

    let cmds = reads(40);
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = qemu_io(&d.uri, &cmds);
    let reached = kit.reads() - before;

    assert_eq!(ok_reads(&out), 40, "{out}");
    // The first read waits for the timeout; then only the background retry
    // (after 1 s, then 2 s) asks the hung replica, never the 40 reads.
    assert!(reached <= 4, "{reached} reads reached the hung replica");
    assert!(
        d.log_text().contains("replica replica-2 is failed"),
        "{}",
        d.log_text()
    );

    pause_control(&control, b'r');
    wait_for("the replica back in service", || {
        d.log_text().contains("replica replica-2 is in-sync again")
    });
    let before = kit.reads();
    let out = qemu_io(&d.uri, &["read -P 0x5a 0 4k"]);
    assert_eq!((ok_reads(&out), kit.reads() - before), (1, 1), "{out}");
}

#[test]
fn replica_failing_every_read_is_logged_once_then_summarised_exactly() {
    let (disk, kit, _) = with_remote(
        &["error"],
        &["error-pread=EIO".into(), "error-pread-rate=100%".into()],
    );
    // No record: with one, the replica's failed reads would be recorded as
    // missed and it would stop voting there; this test is about the log.
    let d = Daemon::start(&disk, &["--no-tracking"]);

    let cmds = reads(300);
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = qemu_io(&d.uri, &cmds);
    let failed_on_replica = kit.reads();
    let code = d.stop();
    let log = std::fs::read_to_string(disk.dir.path().join("serve.log")).unwrap();

    assert_eq!((ok_reads(&out), code), (300, Some(0)), "{out}");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("QUORUM_REPORT_BAD"))
        .collect();
    // The first event in full, then one "N more ..." line per 10 s window
    // (and the rest at shutdown): together, every event exactly once.
    let full = lines
        .iter()
        .filter(|l| l.contains("replica reported bad"))
        .count();
    let summarised: usize = lines
        .iter()
        .filter_map(|l| {
            l.split(" more QUORUM_REPORT_BAD")
                .next()?
                .rsplit(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert!(
        lines.len() <= 4,
        "{} lines:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert_eq!(
        (full + summarised, failed_on_replica >= 300),
        (failed_on_replica, true),
        "{log}"
    );
}

#[test]
fn replica_that_goes_away_logs_one_state_change_not_a_line_per_request() {
    let (disk, kit, _) = with_remote(&[], &[]);
    let d = Daemon::start(&disk, &[]);
    drop(kit);

    let cmds = reads(300);
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = qemu_io(&d.uri, &cmds);
    let log = d.log_text();

    assert_eq!(ok_reads(&out), 300, "{out}");
    let about_it = log.lines().filter(|l| l.contains("replica-2")).count();
    assert!(
        log.contains("replica replica-2 is failed") && about_it <= 3,
        "{about_it} lines:\n{log}"
    );
}
