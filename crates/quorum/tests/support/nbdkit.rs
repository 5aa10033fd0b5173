//! nbdkit as a remote replica: the `file` plugin on a unix socket, behind
//! nbdkit's `log` filter (every request as it arrives) and any others, and
//! the XML `<backingStore>` that names it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::require;

/// nbdkit serving a raw file on a unix socket, killed by PID on drop.
pub struct Nbdkit {
    child: Option<Child>,
    /// Its unix socket.
    pub socket: PathBuf,
    /// The file it serves.
    pub file: PathBuf,
    /// The `log` filter's output.
    pub log: PathBuf,
    filters: Vec<String>,
    args: Vec<String>,
}

impl Nbdkit {
    /// `nbdkit --filter=log --filter=F... file FILE ARGS` with its socket,
    /// pid file and log in `dir`; ready when it returns.
    pub fn start(dir: &Path, file: &Path, filters: &[&str], args: &[String]) -> Nbdkit {
        let mut k = Nbdkit {
            child: None,
            socket: dir.join("remote.sock"),
            file: file.to_owned(),
            log: dir.join("nbdkit.log"),
            filters: filters.iter().map(|f| format!("--filter={f}")).collect(),
            args: args.to_vec(),
        };
        k.spawn();
        k
    }

    /// Start it (again, after [`Nbdkit::kill9`]) and wait (bounded) for its
    /// pid file.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let pid = self.socket.with_extension("pid");
        let _ = std::fs::remove_file(&pid);
        let child = Command::new(require("nbdkit"))
            .args(["-f", "--exit-with-parent", "-U"])
            .arg(&self.socket)
            .arg("-P")
            .arg(&pid)
            .arg("--filter=log")
            .args(&self.filters)
            .arg("file")
            .arg(&self.file)
            .arg(format!("logfile={}", self.log.display()))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nbdkit");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::metadata(&pid).is_ok_and(|m| m.len() > 0) {
            assert!(Instant::now() < deadline, "nbdkit not ready within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9, and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Read requests that reached nbdkit so far.
    pub fn reads(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Read id=") && l.contains("offset="))
            .count()
    }

    /// The `<backingStore>` of this export, to add to a disk's XML.
    pub fn backing_store(&self) -> String {
        format!(
            "  <backingStore type='network'>\n    <format type='raw'/>\n    <source protocol='nbd'>\n      <host transport='unix' socket='{}'/>\n    </source>\n  </backingStore>\n",
            self.socket.display()
        )
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `xml` with `stores` added as replicas, after the others.
pub fn with_replicas(xml: &str, stores: &[&Nbdkit]) -> String {
    let add: String = stores.iter().map(|k| k.backing_store()).collect();
    xml.replace("  <target ", &format!("{add}  <target "))
}
