//! Shared helpers for the end-to-end tests against real peers (qemu-io,
//! qemu-img, nbdinfo, nbdcopy, nbdsh, fio).
//!
//! Shape: a [`Disk`] is a temp dir holding replica images plus the quorum
//! disk XML that names them; [`Daemon`] runs `quorum serve` on that XML and
//! is killed by PID when dropped; [`run`] runs any peer with a timeout and
//! captures its output. Peers that are missing make the test fail loudly.

#![allow(dead_code)] // each test binary uses a different subset

pub mod nbdkit;
pub mod qmp;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The quorum binary under test.
pub const QUORUM: &str = env!("CARGO_BIN_EXE_quorum");

/// Where the quorum commands the tests run keep disk records (not the
/// machine's /var/lib/quorum): records are named by the replicas' paths,
/// which are unique temp dirs, so tests never share one.
pub fn state_dir() -> PathBuf {
    std::env::temp_dir().join("quorum-test-state")
}

/// Default bound for one peer command.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Panic unless `tool` is on PATH (or is an existing path); returns its path.
pub fn require(tool: &str) -> PathBuf {
    let direct = Path::new(tool);
    if direct.is_absolute() && direct.is_file() {
        return direct.to_path_buf();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "required peer program `{tool}` is not installed (see scripts/ for the CI setup)"
            )
        })
}

/// What a finished command did.
#[derive(Debug)]
pub struct Output {
    /// Exit code; `None` if killed by a signal.
    pub code: Option<i32>,
    /// Captured stdout.
    pub stdout: String,
    /// Captured stderr.
    pub stderr: String,
}

impl Output {
    /// True when the command exited 0.
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout followed by stderr, for text assertions.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Run `cmd` with `timeout`, capturing stdout and stderr. Panics (after
/// killing it) if it runs past the timeout.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    run_with_input(cmd, None, timeout)
}

/// As [`run_timeout`], with `input` written to its stdin (then closed);
/// `None` gives it no stdin.
pub fn run_with_input(cmd: &mut Command, input: Option<&str>, timeout: Duration) -> Output {
    if cmd.get_program() == QUORUM {
        cmd.env("QUORUM_STATE_DIR", state_dir());
    }
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let writer = input.map(|text| {
        let mut stdin = child.stdin.take().expect("piped stdin");
        let text = text.to_owned();
        std::thread::spawn(move || {
            let _ = stdin.write_all(text.as_bytes());
        })
    });
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let status = wait_bounded(&mut child, timeout);
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{desc} did not finish within {timeout:?}");
    };
    if let Some(w) = writer {
        w.join().expect("stdin writer");
    }
    let stdout = String::from_utf8_lossy(&t_out.join().expect("stdout reader")).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().expect("stderr reader")).into_owned();
    Output {
        code: status.code(),
        stdout,
        stderr,
    }
}

/// Run `cmd` with the default timeout.
pub fn run(cmd: &mut Command) -> Output {
    run_timeout(cmd, TIMEOUT)
}

/// Run peer `tool` (checked with [`require`]) with `args`.
pub fn tool<I, S>(tool: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run(Command::new(require(tool)).args(args))
}

/// Run the quorum binary with `args`.
pub fn quorum<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run(Command::new(QUORUM).args(args))
}

/// Poll `child` until it exits or `timeout` passes.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Image format of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Raw file.
    Raw,
    /// qcow2 image.
    Qcow2,
}

impl Format {
    /// The name QEMU and the XML use.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// One replica image (and optionally a raw backing file in its XML chain).
#[derive(Debug, Clone)]
pub struct Replica {
    /// Image path.
    pub path: PathBuf,
    /// Image format.
    pub format: Format,
    /// Raw backing file of a qcow2 replica, named in the XML chain.
    pub backing: Option<PathBuf>,
}

/// Knobs of the `<driver>` / `<threshold>` elements.
#[derive(Debug, Clone)]
pub struct Options {
    /// Vote threshold.
    pub threshold: usize,
    /// `rewrite_corrupted='on'`.
    pub rewrite_corrupted: bool,
    /// `read_pattern`: `quorum` or `fifo`.
    pub read_pattern: &'static str,
    /// `blkverify='on'`.
    pub blkverify: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            threshold: 2,
            rewrite_corrupted: false,
            read_pattern: "quorum",
            blkverify: false,
        }
    }
}

/// A temp dir with replica images and a quorum disk XML naming them.
pub struct Disk {
    /// The temp dir (removed on drop).
    pub dir: tempfile::TempDir,
    /// The replicas, in XML order (replica 0 first).
    pub replicas: Vec<Replica>,
    /// Virtual size in bytes.
    pub size: u64,
    /// Path of the XML file.
    pub xml: PathBuf,
}

impl Disk {
    /// Create images of `formats` (all `size` bytes, unallocated) and an XML.
    pub fn new(formats: &[Format], size: u64, opts: &Options) -> Disk {
        let dir = tempfile::Builder::new()
            .prefix("quorum-e2e-")
            .tempdir()
            .expect("temp dir");
        let replicas = formats
            .iter()
            .enumerate()
            .map(|(i, &format)| {
                let path = dir.path().join(format!("r{i}.{}", format.name()));
                create_image(&path, format, size, None);
                Replica {
                    path,
                    format,
                    backing: None,
                }
            })
            .collect();
        let xml = dir.path().join("disk.xml");
        let disk = Disk {
            dir,
            replicas,
            size,
            xml,
        };
        disk.write_xml(opts);
        disk
    }

    /// `n` raw replicas, every one filled with `pattern` over the whole disk.
    pub fn raw_filled(n: usize, size: u64, pattern: u8, opts: &Options) -> Disk {
        let disk = Disk::new(&vec![Format::Raw; n], size, opts);
        for i in 0..n {
            disk.fill(i, pattern, 0, size);
        }
        disk
    }

    /// Rewrite the XML with new options (e.g. turn rewrite_corrupted on).
    pub fn write_xml(&self, opts: &Options) {
        std::fs::write(&self.xml, self.xml_text(opts)).expect("write disk xml");
    }

    /// The XML text for these replicas and `opts`.
    pub fn xml_text(&self, opts: &Options) -> String {
        let mut s = String::new();
        s.push_str("<disk type='quorum' device='disk'>\n");
        let _ = writeln!(
            s,
            "  <driver name='qemu' type='quorum' read_pattern='{}' rewrite_corrupted='{}' blkverify='{}'/>",
            opts.read_pattern,
            on_off(opts.rewrite_corrupted),
            on_off(opts.blkverify),
        );
        let _ = writeln!(s, "  <threshold value='{}'/>", opts.threshold);
        for r in &self.replicas {
            s.push_str("  <backingStore type='file'>\n");
            let _ = writeln!(s, "    <format type='{}'/>", r.format.name());
            let _ = writeln!(s, "    <source file='{}'/>", r.path.display());
            match &r.backing {
                Some(b) => {
                    s.push_str("    <backingStore type='file'>\n");
                    s.push_str("      <format type='raw'/>\n");
                    let _ = writeln!(s, "      <source file='{}'/>", b.display());
                    s.push_str("      <backingStore/>\n");
                    s.push_str("    </backingStore>\n");
                }
                None if r.format == Format::Qcow2 => s.push_str("    <backingStore/>\n"),
                None => {}
            }
            s.push_str("  </backingStore>\n");
        }
        s.push_str("  <target dev='vda' bus='virtio'/>\n</disk>\n");
        s
    }

    /// Path of replica `i`.
    pub fn path(&self, i: usize) -> &Path {
        &self.replicas[i].path
    }

    /// A file path inside the temp dir.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Give qcow2 replica `i` a raw backing file filled with `pattern`,
    /// recreating the (empty) qcow2 on top of it.
    pub fn add_raw_backing(&mut self, i: usize, pattern: u8, opts: &Options) {
        let base = self.dir.path().join(format!("base{i}.raw"));
        create_image(&base, Format::Raw, self.size, None);
        qemu_io_file(
            &base,
            Format::Raw,
            &format!("write -P {pattern:#x} 0 {}", self.size),
        );
        std::fs::remove_file(&self.replicas[i].path).expect("remove replica");
        create_image(
            &self.replicas[i].path,
            Format::Qcow2,
            self.size,
            Some(&base),
        );
        self.replicas[i].backing = Some(base);
        self.write_xml(opts);
    }

    /// Write `pattern` into replica `i` at `off..off+len` directly (locking off,
    /// so it works while a daemon holds the image).
    pub fn fill(&self, i: usize, pattern: u8, off: u64, len: u64) {
        let r = &self.replicas[i];
        qemu_io_file(
            &r.path,
            r.format,
            &format!("write -P {pattern:#x} {off} {len}"),
        );
    }

    /// Check replica `i` holds `pattern` at `off..off+len` (via qemu-io on the file).
    pub fn replica_has(&self, i: usize, pattern: u8, off: u64, len: u64) -> Output {
        let r = &self.replicas[i];
        qemu_io_file_out(
            &r.path,
            r.format,
            &format!("read -P {pattern:#x} {off} {len}"),
        )
    }

    /// Overwrite bytes of a raw replica file from Rust.
    pub fn poke_raw(&self, i: usize, off: u64, data: &[u8]) {
        assert_eq!(
            self.replicas[i].format,
            Format::Raw,
            "poke_raw needs a raw replica"
        );
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path(i))
            .expect("open replica");
        f.write_all_at(data, off).expect("poke replica");
        f.sync_all().expect("sync replica");
    }

    /// Read bytes of a raw replica file from Rust.
    pub fn peek_raw(&self, i: usize, off: u64, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(self.path(i)).expect("open replica");
        let mut buf = vec![0; len];
        f.read_exact_at(&mut buf, off).expect("read replica");
        buf
    }

    /// `--image-opts` string for QEMU's quorum over these replicas, locking off.
    pub fn qemu_quorum_json(&self, opts: &Options) -> String {
        let children: Vec<String> = self
            .replicas
            .iter()
            .map(|r| {
                let file = format!(
                    r#"{{"driver":"file","filename":"{}","locking":"off"}}"#,
                    r.path.display()
                );
                match (r.format, &r.backing) {
                    (Format::Raw, _) => format!(r#"{{"driver":"raw","file":{file}}}"#),
                    (Format::Qcow2, None) => {
                        format!(r#"{{"driver":"qcow2","file":{file},"backing":null}}"#)
                    }
                    (Format::Qcow2, Some(b)) => format!(
                        r#"{{"driver":"qcow2","file":{file},"backing":{{"driver":"raw","file":{{"driver":"file","filename":"{}","locking":"off"}}}}}}"#,
                        b.display()
                    ),
                }
            })
            .collect();
        format!(
            r#"json:{{"driver":"quorum","vote-threshold":{},"read-pattern":"{}","rewrite-corrupted":{},"children":[{}]}}"#,
            opts.threshold,
            opts.read_pattern,
            opts.rewrite_corrupted,
            children.join(",")
        )
    }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// `qemu-img create` an image (qcow2 optionally on a raw backing file).
pub fn create_image(path: &Path, format: Format, size: u64, backing: Option<&Path>) {
    let mut cmd = Command::new(require("qemu-img"));
    cmd.args(["create", "-q", "-f", format.name()]);
    if let Some(b) = backing {
        cmd.arg("-b").arg(b).args(["-F", "raw"]);
    }
    cmd.arg(path).arg(size.to_string());
    let out = run(&mut cmd);
    assert!(out.ok(), "qemu-img create failed: {out}");
}

/// `--image-opts` for one image file with locking off.
pub fn image_opts(path: &Path, format: Format) -> String {
    format!(
        "driver={},file.driver=file,file.filename={},file.locking=off",
        format.name(),
        path.display()
    )
}

/// Run one qemu-io command on an image file (locking off), returning the output.
pub fn qemu_io_file_out(path: &Path, format: Format, command: &str) -> Output {
    tool(
        "qemu-io",
        ["--image-opts", "-c", command, &image_opts(path, format)],
    )
}

/// Run one qemu-io command on an image file and assert it succeeded.
pub fn qemu_io_file(path: &Path, format: Format, command: &str) {
    let out = qemu_io_file_out(path, format, command);
    assert!(
        out.ok() && !out.text().contains("failed"),
        "qemu-io {command} on {} failed: {out}",
        path.display()
    );
}

/// Run qemu-io commands against a filename (an NBD URI or `json:` string).
pub fn qemu_io(target: &str, commands: &[&str]) -> Output {
    qemu_io_flags(target, &[], commands)
}

/// As [`qemu_io`], opening read-only (`-r`), as a read-only export needs.
pub fn qemu_io_read_only(target: &str, commands: &[&str]) -> Output {
    qemu_io_flags(target, &["-r"], commands)
}

/// As [`qemu_io`] with a writeback cache: writes carry no FUA flag, so
/// they take the daemon's fast paths (qemu-io defaults to writethrough).
pub fn qemu_io_writeback(target: &str, commands: &[&str]) -> Output {
    qemu_io_flags(target, &["-t", "writeback"], commands)
}

fn qemu_io_flags(target: &str, flags: &[&str], commands: &[&str]) -> Output {
    let mut args: Vec<String> = flags.iter().map(|f| (*f).to_owned()).collect();
    if !target.starts_with("json:") {
        args.extend(["-f".into(), "raw".into()]);
    }
    for c in commands {
        args.push("-c".into());
        args.push((*c).into());
    }
    args.push(target.into());
    tool("qemu-io", args)
}

/// Lines of qemu-io output that carry results (drops the timing lines).
pub fn result_lines(out: &Output) -> Vec<String> {
    out.text()
        .lines()
        .filter(|l| !l.contains(" ops; "))
        .map(str::to_owned)
        .collect()
}

/// A running `quorum serve`, killed by PID on drop.
pub struct Daemon {
    child: Option<Child>,
    /// The unix socket it listens on.
    pub socket: PathBuf,
    /// The pid file it writes.
    pub pid_file: PathBuf,
    /// `nbd+unix:///vda?socket=...`
    pub uri: String,
    log: PathBuf,
}

impl Daemon {
    /// Start `quorum serve XML --socket ... --pid-file ... EXTRA` in the disk's dir
    /// and wait (bounded) until the socket accepts.
    pub fn start(disk: &Disk, extra: &[&str]) -> Daemon {
        Daemon::start_at(&disk.xml, disk.dir.path(), extra)
    }

    /// As [`Daemon::start`], with the daemon confined to CPU 0: it then
    /// takes its single-CPU paths (inline large requests, streamed writes).
    pub fn start_on_one_cpu(disk: &Disk, extra: &[&str]) -> Daemon {
        Daemon::spawn(&disk.xml, disk.dir.path(), extra, true)
    }

    /// As [`Daemon::start`], for any XML; socket and logs go in `dir`.
    pub fn start_at(xml: &Path, dir: &Path, extra: &[&str]) -> Daemon {
        Daemon::spawn(xml, dir, extra, false)
    }

    fn spawn(xml: &Path, dir: &Path, extra: &[&str], one_cpu: bool) -> Daemon {
        let socket = dir.join("nbd.sock");
        let pid_file = dir.join("quorum.pid");
        let log = dir.join("serve.log");
        let out_path = dir.join("serve.out");
        let mut cmd = Command::new(QUORUM);
        cmd.env("QUORUM_STATE_DIR", state_dir())
            .arg("serve")
            .arg(xml)
            .arg("--socket")
            .arg(&socket)
            .arg("--pid-file")
            .arg(&pid_file)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).expect("serve.out"))
            .stderr(std::fs::File::create(&log).expect("serve.log"));
        if one_cpu {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(0, &mut set);
                    if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("start quorum serve");
        let export = extra
            .windows(2)
            .find(|w| w[0] == "--export")
            .map_or("vda", |w| w[1]);
        let mut d = Daemon {
            child: Some(child),
            uri: format!("nbd+unix:///{export}?socket={}", socket.display()),
            socket,
            pid_file,
            log,
        };
        d.wait_ready(&out_path);
        d
    }

    fn wait_ready(&mut self, out_path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .expect("child")
                .try_wait()
                .expect("try_wait")
            {
                self.child = None;
                panic!("quorum serve exited early ({st}):\n{}", self.log_text());
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "quorum serve not ready within 10 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The ready line is printed right after bind; tolerate a short lag.
        let stdout = std::fs::read_to_string(out_path).unwrap_or_default();
        assert!(
            stdout.is_empty() || stdout.contains("quorum: serving"),
            "unexpected serve output: {stdout}"
        );
    }

    /// The daemon's PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Its stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL (a crash) and reap it.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("daemon running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM and wait (bounded); returns the exit code.
    pub fn stop(mut self) -> Option<i32> {
        let mut child = self.child.take().expect("daemon running");
        terminate(&mut child)
    }
}

/// SIGTERM, wait up to 10 s, then SIGKILL.
fn terminate(child: &mut Child) -> Option<i32> {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on the PID of our own child, which has not been reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    match wait_bounded(child, Duration::from_secs(10)) {
        Some(st) => st.code(),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }
}

/// Write a file of `len` bytes where byte k is a function of k and `seed`.
pub fn write_seeded_file(path: &Path, len: usize, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..len)
        .map(|k| (k as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 ^ seed)
        .collect();
    let mut f = std::fs::File::create(path).expect("create data file");
    f.write_all(&data).expect("write data file");
    data
}
