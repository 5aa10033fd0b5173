//! A real VM under libvirt boots from a quorum disk: libvirtd with the QEMU
//! driver (TCG), the hook installed by `quorum libvirt-hook --install`, the
//! domain defined by `quorum define`. The guest is a 512-byte boot sector
//! that prints a string on COM1 and halts; SeaBIOS loads it through
//! virtio-blk from the NBD socket quorum serves; booted again with the
//! first replica's copy of that sector corrupted, it still boots, and the
//! daemon logs that replica as bad.
//!
//! libvirtd runs without systemd, in a mount namespace of its own
//! (`unshare -m`) where /etc/libvirt, /run/libvirt, /var/lib/libvirt,
//! /var/log/libvirt, /etc/passwd and /etc/group are bind mounts of files in
//! the test's temp dir: nothing of the host's libvirt set-up is read or
//! changed. Needs root, unshare and mount (util-linux), libvirtd and its
//! QEMU driver (libvirt-daemon, libvirt-daemon-driver-qemu), virsh and
//! qemu-system-x86_64; fails if any is missing. libvirtd, QEMU and the
//! quorum daemons are stopped by PID when a test ends, also on failure.

mod support;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{QUORUM, require};

const MIB: usize = 1 << 20;
const GREETING: &str = "QUORUM-BOOT-OK";
/// uid/gid given to libvirt-qemu and kvm when the host has no such entries.
const QEMU_UID: u32 = 64055;
const KVM_GID: u32 = 64056;

/// Real-mode code: DS=0, print the NUL-terminated string after it to COM1
/// (port 0x3f8), then halt forever; padded, with the boot signature.
fn boot_sector() -> Vec<u8> {
    let code: [u8; 23] = [
        0xFC, // cld
        0x31, 0xC0, // xor ax, ax
        0x8E, 0xD8, // mov ds, ax
        0xBE, 0x17, 0x7C, // mov si, 0x7c17 (the string)
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0xAC, // 0x0b: lodsb
        0x84, 0xC0, // test al, al
        0x74, 0x03, // jz 0x13
        0xEE, // out dx, al
        0xEB, 0xF8, // jmp 0x0b
        0xFA, // 0x13: cli
        0xF4, // hlt
        0xEB, 0xFD, // jmp hlt
    ];
    let mut s = code.to_vec();
    s.extend_from_slice(GREETING.as_bytes());
    s.extend_from_slice(b"\r\n\0");
    s.resize(510, 0);
    s.extend_from_slice(&[0x55, 0xAA]);
    s
}

fn alive(pid: i32) -> bool {
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

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// SIGTERM, wait up to 10 s, then SIGKILL.
fn stop_pid(pid: i32) {
    // SAFETY: kill(2) on a process this test started (directly or through libvirtd).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// `name:` entry of a passwd/group file, if any.
fn entry<'a>(file: &'a str, name: &str) -> Option<&'a str> {
    file.lines().find(|l| l.split(':').next() == Some(name))
}

/// libvirtd in a mount namespace of its own, rooted in a temp dir.
struct Libvirtd {
    dir: tempfile::TempDir,
    pid: i32,
    /// libvirtd itself (unshare and sh exec it), reaped on drop.
    child: Option<std::process::Child>,
    uri: String,
    /// QEMU's uid and gid as configured.
    qemu_ids: (u32, u32),
}

impl Libvirtd {
    /// Start it with QEMU running as `user:group` (`root:root` or
    /// `libvirt-qemu:kvm`).
    fn start(user: &str, group: &str) -> Libvirtd {
        for tool in [
            "unshare",
            "mount",
            "libvirtd",
            "virsh",
            "qemu-system-x86_64",
        ] {
            require(tool);
        }
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "libvirtd with the QEMU driver needs root");
        let dir = tempfile::Builder::new()
            .prefix("qv")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let d = dir.path();
        for sub in [
            "etc/hooks",
            "run-libvirt",
            "var-lib",
            "var-log/qemu",
            "sock",
            "run",
            "state",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        // Mount points on the host: empty folders, created if missing.
        for m in [
            "/etc/libvirt",
            "/run/libvirt",
            "/var/lib/libvirt",
            "/var/log/libvirt",
        ] {
            std::fs::create_dir_all(m).unwrap();
        }
        let mut passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        let mut groups = std::fs::read_to_string("/etc/group").unwrap();
        if entry(&groups, "kvm").is_none() {
            groups.push_str(&format!("kvm:x:{KVM_GID}:libvirt-qemu\n"));
        }
        if entry(&groups, "libvirt-qemu").is_none() {
            groups.push_str(&format!("libvirt-qemu:x:{QEMU_UID}:\n"));
        }
        if entry(&passwd, "libvirt-qemu").is_none() {
            passwd.push_str(&format!(
                "libvirt-qemu:x:{QEMU_UID}:{KVM_GID}:libvirt qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
            ));
        }
        let id_of = |file: &str, name: &str| -> u32 {
            entry(file, name)
                .and_then(|l| l.split(':').nth(2))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no id for {name}"))
        };
        let qemu_ids = (id_of(&passwd, user), id_of(&groups, group));
        std::fs::write(d.join("passwd"), passwd).unwrap();
        std::fs::write(d.join("group"), groups).unwrap();
        std::fs::write(
            d.join("libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n\
                 log_outputs = \"3:file:{}\"\n",
                d.join("sock").display(),
                d.join("libvirtd.log").display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("etc/qemu.conf"),
            format!(
                "security_driver = \"none\"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n\
                 stdio_handler = \"file\"\nuser = \"{user}\"\ngroup = \"{group}\"\n"
            ),
        )
        .unwrap();
        let install = support::run(
            Command::new(QUORUM)
                .env("QUORUM_STATE_DIR", d.join("state"))
                .args(["libvirt-hook", "--install", "--hooks-dir"])
                .arg(d.join("etc/hooks"))
                .arg("--runtime-dir")
                .arg(d.join("run")),
        );
        assert!(install.ok(), "{install}");

        let script = format!(
            "set -e\n\
             mount --bind {d}/etc /etc/libvirt\n\
             mount --bind {d}/run-libvirt /run/libvirt\n\
             mount --bind {d}/var-lib /var/lib/libvirt\n\
             mount --bind {d}/var-log /var/log/libvirt\n\
             mount --bind {d}/passwd /etc/passwd\n\
             mount --bind {d}/group /etc/group\n\
             exec libvirtd -f {d}/libvirtd.conf --pid-file {d}/libvirtd.pid\n",
            d = d.display()
        );
        let out = std::fs::File::create(d.join("libvirtd.out")).unwrap();
        let mut child = Command::new(require("unshare"))
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("start libvirtd");
        // unshare and sh exec: the child's PID is libvirtd's.
        let pid = child.id() as i32;
        let sock = d.join("sock/libvirt-sock");
        let uri = format!("qemu:///system?socket={}", sock.display());
        let mut daemon = Libvirtd {
            dir,
            pid,
            child: None,
            uri,
            qemu_ids,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("libvirtd exited ({st}):\n{}", daemon.logs());
            }
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                let v = daemon.virsh(&["version"]);
                if v.ok() {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd not ready within 60 s:\n{}",
                daemon.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon.child = Some(child);
        daemon
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn logs(&self) -> String {
        let read = |p: &str| std::fs::read_to_string(self.path(p)).unwrap_or_default();
        let errors: String = read("libvirtd.log")
            .lines()
            .filter(|l| l.contains(" error : "))
            .map(|l| format!("{l}\n"))
            .collect();
        format!("{}{errors}", read("libvirtd.out"))
    }

    fn virsh(&self, args: &[&str]) -> support::Output {
        support::run(
            Command::new(require("virsh"))
                .arg("-c")
                .arg(&self.uri)
                .args(args),
        )
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let _ = self.virsh(&["destroy", "qboot"]);
        for entry in std::fs::read_dir(self.path("run-libvirt/qemu"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.path().extension().is_some_and(|e| e == "pid")
                && let Some(pid) = read_pid(&entry.path())
            {
                stop_pid(pid);
            }
        }
        for dom in std::fs::read_dir(self.path("run"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in std::fs::read_dir(dom.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if f.path().extension().is_some_and(|e| e == "pid")
                    && let Some(pid) = read_pid(&f.path())
                {
                    stop_pid(pid);
                }
            }
        }
        stop_pid(self.pid);
        if let Some(mut c) = self.child.take() {
            let _ = c.try_wait();
        }
    }
}

/// Three raw replicas holding the boot sector.
fn replicas(dir: &Path) -> [PathBuf; 3] {
    let sector = boot_sector();
    let paths = [0, 1, 2].map(|i| dir.join(format!("r{i}.raw")));
    for p in &paths {
        let mut img = sector.clone();
        img.resize(MIB, 0);
        std::fs::write(p, img).unwrap();
    }
    paths
}

/// Overwrite the boot sector of replica `r`, behind quorum's back.
fn corrupt_boot_sector(r: &Path) {
    let mut bad = std::fs::read(r).unwrap();
    bad[..512].copy_from_slice(&[0xde; 512]);
    std::fs::write(r, bad).unwrap();
}

fn domain_xml(r: &[PathBuf; 3], serial: &Path) -> String {
    let stores: String = r
        .iter()
        .map(|p| {
            format!(
                "<backingStore type='file'><format type='raw'/><source file='{}'/></backingStore>\n",
                p.display()
            )
        })
        .collect();
    format!(
        "<domain type='qemu'>\n  <name>qboot</name>\n  <memory unit='MiB'>64</memory>\n  <vcpu>1</vcpu>\n\
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\n  <features><acpi/></features>\n\
         <devices>\n<disk type='quorum' device='disk'>\n<threshold value='2'/>\n{stores}\
         <target dev='vda' bus='virtio'/>\n<boot order='1'/>\n</disk>\n\
         <serial type='file'><source path='{}'/></serial>\n\
         <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>\n<video><model type='none'/></video>\n\
         <memballoon model='none'/>\n</devices>\n</domain>\n",
        serial.display()
    )
}

/// `virsh start`, wait for the greeting on COM1, check the socket's and
/// QEMU's owner, `virsh destroy`, and see the daemon stop cleanly.
/// Returns the daemon's log.
fn boot_once(lv: &Libvirtd, serial: &Path) -> String {
    let _ = std::fs::remove_file(serial);
    let start = lv.virsh(&["start", "qboot"]);
    assert!(start.ok(), "{start}\n{}", lv.logs());

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if text.contains(GREETING) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no greeting on COM1 within 120 s; serial: {text:?}\n{}",
            lv.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = lv.path("run/qboot");
    let sock = std::fs::metadata(run.join("vda.sock")).expect("the daemon's socket");
    assert_eq!(
        (sock.uid(), sock.gid()),
        lv.qemu_ids,
        "the socket belongs to QEMU's user"
    );
    let qemu_pid = read_pid(&lv.path("run-libvirt/qemu/qboot.pid")).expect("QEMU's pid");
    let qemu_uid = std::fs::metadata(format!("/proc/{qemu_pid}"))
        .unwrap()
        .uid();
    assert_eq!(qemu_uid, lv.qemu_ids.0, "QEMU runs as the configured user");
    let serve_pid = read_pid(&run.join("vda.pid")).expect("the daemon's pid");

    let destroy = lv.virsh(&["destroy", "qboot"]);

    assert!(destroy.ok(), "{destroy}");
    // release has returned when destroy has: the daemon is gone.
    assert!(
        !alive(serve_pid),
        "quorum serve still runs after virsh destroy"
    );
    let log = std::fs::read_to_string(run.join("vda.log")).unwrap();
    assert!(log.trim_end().ends_with("stopped cleanly"), "{log}");
    log
}

/// Define; boot once with three good replicas (the daemon's record now
/// exists); corrupt replica 0's boot sector; boot again: the guest still
/// prints its greeting, and the daemon logged replica 0 as bad.
fn boots_from_the_voted_disk(user: &str, group: &str) {
    let lv = Libvirtd::start(user, group);
    let r = replicas(lv.dir.path());
    let serial = lv.path("serial.log");
    let xml = lv.path("vm.xml");
    std::fs::write(&xml, domain_xml(&r, &serial)).unwrap();
    let define = support::run(
        Command::new(QUORUM)
            .args(["define"])
            .arg(&xml)
            .args(["--connect", &lv.uri, "--runtime-dir"])
            .arg(lv.path("run")),
    );
    assert!(define.ok(), "{define}");
    let first = boot_once(&lv, &serial);
    assert!(!first.contains("QUORUM_REPORT_BAD"), "{first}");

    corrupt_boot_sector(&r[0]);
    let log = boot_once(&lv, &serial);

    let second_run = &log[first.len()..];
    let bad: Vec<&str> = second_run
        .lines()
        .filter(|l| l.contains("QUORUM_REPORT_BAD"))
        .collect();
    assert!(!bad.is_empty(), "no bad replica logged:\n{second_run}");
    assert!(
        bad[0].contains("node_name=replica-0") && bad[0].contains("sector_num=0"),
        "{bad:?}"
    );
    // Later lines may sum up repeats; none blames another replica.
    assert!(bad.iter().all(|l| l.contains("replica-0")), "{bad:?}");
}

#[test]
fn a_vm_boots_from_a_quorum_disk_under_libvirt() {
    boots_from_the_voted_disk("root", "root");
}

#[test]
fn a_vm_whose_qemu_is_not_root_reaches_the_socket() {
    boots_from_the_voted_disk("libvirt-qemu", "kvm");
}

/// A `<disk type='quorum'>` file for target `dev`: two raw replicas.
fn data_disk(lv: &Libvirtd, dev: &str) -> PathBuf {
    let mut stores = String::new();
    for i in 0..2 {
        let p = lv.path(&format!("{dev}-{i}.raw"));
        std::fs::write(&p, vec![0x5au8; MIB]).unwrap();
        stores.push_str(&format!(
            "<backingStore type='file'><format type='raw'/><source file='{}'/></backingStore>",
            p.display()
        ));
    }
    let xml = lv.path(&format!("{dev}.xml"));
    std::fs::write(
        &xml,
        format!("<disk type='quorum'><threshold value='2'/>{stores}<target dev='{dev}' bus='virtio'/></disk>\n"),
    )
    .unwrap();
    xml
}

fn quorum_ok(lv: &Libvirtd, args: &[&str]) -> support::Output {
    let out = support::run(
        Command::new(QUORUM)
            .args(args)
            .args(["--connect", &lv.uri, "--runtime-dir"])
            .arg(lv.path("run")),
    );
    assert!(out.ok(), "quorum {args:?}: {out}\n{}", lv.logs());
    out
}

/// `virsh domblklist` targets (live, or `--inactive`).
fn targets(lv: &Libvirtd, inactive: bool) -> Vec<String> {
    let mut args = vec!["domblklist", "qboot"];
    if inactive {
        args.push("--inactive");
    }
    let out = lv.virsh(&args);
    assert!(out.ok(), "{out}");
    out.stdout
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Does the domain's XML (live or inactive) hold quorum disk `dev` in its metadata?
fn in_metadata(lv: &Libvirtd, inactive: bool, dev: &str) -> bool {
    let mut args = vec!["dumpxml", "qboot"];
    if inactive {
        args.push("--inactive");
    }
    let xml = lv.virsh(&args).stdout;
    quorum_config::parse_str(&xml, "d.xml", Path::new("/"), Some(dev))
        .is_ok_and(|d| d.target.dev == dev)
        && xml.contains(&format!("target=\"{dev}\""))
}

#[test]
fn attach_and_detach_keep_devices_metadata_and_daemons_in_step() {
    let lv = Libvirtd::start("libvirt-qemu", "kvm");
    let r = replicas(lv.dir.path());
    let xml = lv.path("vm.xml");
    std::fs::write(&xml, domain_xml(&r, &lv.path("serial.log"))).unwrap();
    quorum_ok(&lv, &["define", xml.to_str().unwrap()]);
    let vdb = data_disk(&lv, "vdb");
    let vdc = data_disk(&lv, "vdc");

    // Off: --config only, no daemon.
    quorum_ok(&lv, &["attach", "qboot", vdb.to_str().unwrap(), "--config"]);
    assert_eq!(targets(&lv, true), ["vda", "vdb"]);
    assert!(in_metadata(&lv, true, "vdb"));
    assert!(!lv.path("run/qboot/vdb.pid").exists());

    // The hook starts both disks' daemons.
    let start = lv.virsh(&["start", "qboot"]);
    assert!(start.ok(), "{start}\n{}", lv.logs());
    let vdb_pid = read_pid(&lv.path("run/qboot/vdb.pid")).expect("vdb's daemon");
    assert!(alive(vdb_pid));

    // Running: live by default; the daemon starts and QEMU gets the socket.
    quorum_ok(&lv, &["attach", "qboot", vdc.to_str().unwrap()]);
    assert_eq!(targets(&lv, false), ["vda", "vdb", "vdc"]);
    assert!(in_metadata(&lv, false, "vdc"));
    assert!(!in_metadata(&lv, true, "vdc"), "live only");
    let vdc_pid = read_pid(&lv.path("run/qboot/vdc.pid")).expect("vdc's daemon");
    let sock = std::fs::metadata(lv.path("run/qboot/vdc.sock")).unwrap();
    assert_eq!((sock.uid(), sock.gid()), lv.qemu_ids);

    // Attaching a target twice is refused, and leaves things as they were.
    let again = support::run(
        Command::new(QUORUM)
            .args([
                "attach",
                "qboot",
                vdc.to_str().unwrap(),
                "--connect",
                &lv.uri,
                "--runtime-dir",
            ])
            .arg(lv.path("run")),
    );
    assert_eq!(again.code, Some(1), "{again}");
    assert!(
        again.stderr.contains("already has a quorum disk 'vdc'"),
        "{again}"
    );
    assert_eq!(read_pid(&lv.path("run/qboot/vdc.pid")), Some(vdc_pid));

    // destroy runs the release hook on the live XML: every daemon stops.
    let destroy = lv.virsh(&["destroy", "qboot"]);
    assert!(destroy.ok(), "{destroy}");
    for pid in [vdb_pid, vdc_pid] {
        assert!(!alive(pid), "daemon {pid} still runs after destroy");
    }

    // Off again: detach from the definition.
    quorum_ok(&lv, &["detach", "qboot", "vdb", "--config"]);
    assert_eq!(targets(&lv, true), ["vda"]);
    assert!(!in_metadata(&lv, true, "vdb"));
    assert!(in_metadata(&lv, true, "vda"));
}
