//! Redundancy that heals itself, against real peers: a remote replica
//! (nbdkit `file` on a unix socket) that is killed and restarted, or whose
//! writes fail for a while (nbdkit `error` filter armed by a file), is
//! marked stale, resynced with only what it missed, and ends identical; a
//! record that is missing, truncated or corrupt means a full comparison,
//! said once, and no data lost. Observed with qemu-io and the daemon's log.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Daemon, Disk, Format, Options, create_image, qemu_io, quorum, require};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const CHUNK: u64 = 64 << 10;

/// nbdkit serving a raw file on a unix socket, killed by PID on drop.
struct Nbdkit {
    child: Option<Child>,
    socket: PathBuf,
    file: PathBuf,
    args: Vec<String>,
}

impl Nbdkit {
    fn start(dir: &Path, file: &Path, args: &[String]) -> Nbdkit {
        let mut k = Nbdkit {
            child: None,
            socket: dir.join("remote.sock"),
            file: file.to_owned(),
            args: args.to_vec(),
        };
        k.spawn();
        k
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let pid = self.socket.with_extension("pid");
        let _ = std::fs::remove_file(&pid);
        let child = Command::new(require("nbdkit"))
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&self.socket)
            .arg("-P")
            .arg(&pid)
            .args(self.args.iter().filter(|a| a.starts_with("--filter")))
            .arg("file")
            .arg(&self.file)
            .args(self.args.iter().filter(|a| !a.starts_with("--filter")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nbdkit");
        self.child = Some(child);
        wait_for("nbdkit's pid file", || {
            std::fs::metadata(&pid).is_ok_and(|m| m.len() > 0)
        });
    }

    /// kill -9, and reap it.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two local raw replicas and a third behind nbdkit, all zero, with the
/// record already knowing every region (a first `check --repair`).
fn setup(args: &[String]) -> (Disk, Nbdkit, PathBuf) {
    let disk = Disk::new(&[Format::Raw; 2], SIZE, &Options::default());
    let remote = disk.file("remote.raw");
    create_image(&remote, Format::Raw, SIZE, None);
    let kit = Nbdkit::start(disk.dir.path(), &remote, args);
    let nbd = format!(
        "  <backingStore type='network'>\n    <format type='raw'/>\n    <source protocol='nbd'>\n      <host transport='unix' socket='{}'/>\n    </source>\n  </backingStore>\n",
        kit.socket.display()
    );
    let xml = disk
        .xml_text(&Options::default())
        .replace("  <target ", &format!("{nbd}  <target "));
    std::fs::write(&disk.xml, xml).expect("write xml");
    let state = disk.file("vda.state");
    let out = quorum([
        "check".as_ref(),
        disk.xml.as_os_str(),
        "--repair".as_ref(),
        "--state".as_ref(),
        state.as_os_str(),
    ]);
    assert!(out.ok(), "{out}");
    (disk, kit, state)
}

fn state_args(state: &Path) -> Vec<String> {
    vec![
        "--state".into(),
        state.display().to_string(),
        "--replica-timeout".into(),
        "2".into(),
    ]
}

fn start(disk: &Disk, args: &[String]) -> Daemon {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(disk, &args)
}

/// The bytes the log says the resync of `replica` copied, once done.
fn resync_completed(d: &Daemon, replica: &str) -> u64 {
    let needle = format!("resync of {replica} completed: ");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = d.log_text();
        let copied = log.lines().find_map(|l| {
            l.split(&needle)
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        });
        if let Some(c) = copied {
            return c;
        }
        assert!(Instant::now() < deadline, "no resync within 30 s:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ten 64 KiB writes of `pattern`, 1 MiB apart.
fn write_ten(d: &Daemon, pattern: u8) {
    let cmds: Vec<String> = (0..10u64)
        .map(|k| format!("write -P {pattern:#x} {} 64k", k * MIB + 4096))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = qemu_io(&d.uri, &cmds);
    assert!(out.ok() && !out.text().contains("failed"), "{out}");
}

fn identical(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn remote_replica_killed_during_writes_is_resynced_with_only_what_it_missed() {
    let (disk, mut kit, state) = setup(&[]);
    let d = start(&disk, &state_args(&state));
    kit.kill9();

    write_ten(&d, 0x33);
    kit.spawn();
    let copied = resync_completed(&d, "replica-2");
    assert_eq!(d.stop(), Some(0));

    // Each 64 KiB write straddles two chunks: 10 x 128 KiB at most.
    let written = 10 * 64 * 1024;
    assert!(
        (written..=2 * written).contains(&copied) && copied <= 20 * CHUNK,
        "copied {copied} bytes for {written} written while the replica was down"
    );
    assert!(
        identical(&kit.file, disk.path(0)),
        "the remote replica differs"
    );
    // Redundancy is back: a corruption of another replica there is outvoted.
    disk.poke_raw(1, MIB + 4096, &[0xee; 4096]);
    let d = start(&disk, &state_args(&state));
    let out = qemu_io(&d.uri, &["read -P 0x33 1052672 64k"]);
    assert!(out.ok() && !out.text().contains("fail"), "{out}");
}

#[test]
fn replica_whose_writes_fail_for_a_while_is_marked_then_resynced() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("fail-writes");
    let (disk, kit, state) = setup(&[
        "--filter=error".into(),
        "error-pwrite=EIO".into(),
        "error-pwrite-rate=100%".into(),
        format!("error-pwrite-file={}", trigger.display()),
    ]);
    let d = start(&disk, &state_args(&state));
    std::fs::write(&trigger, b"").unwrap();

    write_ten(&d, 0x44);
    let stale = d.log_text().contains("replica replica-2 is stale");
    std::fs::remove_file(&trigger).unwrap();
    let copied = resync_completed(&d, "replica-2");
    assert_eq!(d.stop(), Some(0));

    assert!(
        stale,
        "{}",
        std::fs::read_to_string(disk.file("serve.log")).unwrap()
    );
    assert!(
        (10 * 64 * 1024..=20 * CHUNK).contains(&copied),
        "copied {copied}"
    );
    assert!(
        identical(&kit.file, disk.path(0)),
        "the replica differs after the resync"
    );
}

/// A way to damage a record file.
type Damage = Box<dyn Fn(&Path)>;

/// Serve, write, stop cleanly; then damage the record with `damage`, serve
/// again and read: the data is all there, and the log says why every
/// region is compared.
fn with_damaged_record(damage: impl Fn(&Path)) -> (String, support::Output) {
    let (disk, _kit, state) = setup(&[]);
    let d = start(&disk, &state_args(&state));
    write_ten(&d, 0x55);
    assert_eq!(d.stop(), Some(0));
    damage(&state);
    let d = start(&disk, &state_args(&state));
    let cmds: Vec<String> = (0..10u64)
        .map(|k| format!("read -P 0x55 {} 64k", k * MIB + 4096))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = qemu_io(&d.uri, &cmds);
    let log = d.log_text();
    assert_eq!(d.stop(), Some(0));
    (log, out)
}

#[test]
fn missing_truncated_or_corrupt_record_means_a_full_comparison_and_no_loss() {
    let cases: [(&str, Damage); 3] = [
        (
            "it does not exist",
            Box::new(|p| std::fs::remove_file(p).unwrap()),
        ),
        (
            "it is corrupt",
            Box::new(|p| {
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(100).unwrap();
            }),
        ),
        (
            "it is corrupt",
            Box::new(|p| {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.write_all_at(&[0xa5; 8192], 0).unwrap();
            }),
        ),
    ];
    for (why, damage) in cases {
        let (log, out) = with_damaged_record(damage);
        assert!(
            out.ok()
                && !out.text().contains("fail")
                && out.stdout.matches("read 65536/65536").count() == 10,
            "{out}"
        );
        assert!(
            log.contains(why) && log.contains("full resync") && !log.contains("panicked"),
            "{why}:\n{log}"
        );
    }
}

#[test]
fn four_replicas_two_down_during_a_write_never_return_the_old_data() {
    // Replicas 2 and 3 behind nbdkit; both killed, a write, both back: the
    // tie-break would pick the old copies (highest indices) if they voted.
    let disk = Disk::new(&[Format::Raw; 2], SIZE, &Options::default());
    let mut kits = Vec::new();
    let mut xml = disk.xml_text(&Options::default());
    for k in 0..2 {
        let file = disk.file(&format!("remote{k}.raw"));
        create_image(&file, Format::Raw, SIZE, None);
        let sub = disk.dir.path().join(format!("kit{k}"));
        std::fs::create_dir(&sub).unwrap();
        let kit = Nbdkit::start(&sub, &file, &[]);
        let nbd = format!(
            "  <backingStore type='network'>\n    <format type='raw'/>\n    <source protocol='nbd'>\n      <host transport='unix' socket='{}'/>\n    </source>\n  </backingStore>\n",
            kit.socket.display()
        );
        xml = xml.replace("  <target ", &format!("{nbd}  <target "));
        kits.push(kit);
    }
    std::fs::write(&disk.xml, xml).unwrap();
    let state = disk.file("vda.state");
    let d = start(&disk, &state_args(&state));
    for k in &mut kits {
        k.kill9();
    }
    let w = qemu_io(&d.uri, &["write -P 0x66 2M 64k"]);
    for k in &mut kits {
        k.spawn();
    }
    // Read at once, while they may still be stale, and after the resync.
    let early = qemu_io(&d.uri, &["read -P 0x66 2M 64k"]);
    resync_completed(&d, "replica-2");
    resync_completed(&d, "replica-3");
    let late = qemu_io(&d.uri, &["read -P 0x66 2M 64k"]);
    assert!(w.ok() && !w.text().contains("fail"), "{w}");
    for out in [early, late] {
        assert!(out.ok() && !out.text().contains("fail"), "{out}");
    }
}

#[test]
fn restart_during_a_resync_resumes_and_finishes() {
    let (disk, mut kit, state) = setup(&[]);
    // 1 MiB/s: the 4 MiB the replica misses take seconds to copy.
    let mut args = state_args(&state);
    args.extend(["--resync-rate".into(), "1M".into()]);
    let d = start(&disk, &args);
    kit.kill9();
    let out = qemu_io(&d.uri, &["write -P 0x77 0 4M"]);
    assert!(out.ok() && !out.text().contains("fail"), "{out}");
    kit.spawn();
    wait_for("the resync to start", || {
        d.log_text().contains("replica replica-2 is resyncing")
    });
    assert_eq!(d.stop(), Some(0));
    let left = quorum([
        "status".as_ref(),
        disk.xml.as_os_str(),
        "--state".as_ref(),
        state.as_os_str(),
        "--json".as_ref(),
    ]);

    let d = start(&disk, &state_args(&state));
    let copied = resync_completed(&d, "replica-2");
    assert_eq!(d.stop(), Some(0));
    assert!(
        copied > 0 && copied < 4 * MIB,
        "copied {copied} after the restart\n{left}"
    );
    assert!(
        identical(&kit.file, disk.path(0)),
        "the replica differs after the resync"
    );
}

#[test]
fn replica_recreated_empty_is_rebuilt_in_full_as_new() {
    let disk = Disk::new(&[Format::Raw; 3], SIZE, &Options::default());
    let state = disk.file("vda.state");
    let d = start(&disk, &state_args(&state));
    let out = qemu_io(&d.uri, &["write -P 0x12 0 1M", "write -P 0x34 8M 1M"]);
    assert!(out.ok() && !out.text().contains("fail"), "{out}");
    assert_eq!(d.stop(), Some(0));
    // The replica is lost and made again, empty, with `quorum create`.
    std::fs::remove_file(disk.path(1)).unwrap();
    let made = quorum(["create".as_ref(), disk.xml.as_os_str()]);
    assert!(made.ok(), "{made}");

    let d = start(&disk, &state_args(&state));
    let new = d.log_text().contains("replica replica-1 is new");
    let copied = resync_completed(&d, "replica-1");
    assert_eq!(d.stop(), Some(0));
    assert!(
        new,
        "{}",
        std::fs::read_to_string(disk.file("serve.log")).unwrap()
    );
    assert_eq!(copied, SIZE);
    assert!(
        identical(disk.path(1), disk.path(0)),
        "the rebuilt replica differs"
    );
}
