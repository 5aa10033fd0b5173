//! The monitor's socket: accepts QMP clients on the serve process's tokio
//! runtime.
//!
//! Each client has a reader task (frames requests, runs each command on
//! the blocking pool, in order) and a writer task fed by an unbounded
//! queue of lines. Events come from one forwarding thread that receives
//! the engine's events and appends each, serialised once, to every
//! negotiated client's queue: a client that reads slowly only grows its
//! own queue; it never delays I/O, the engine or other clients, and it
//! loses no event. A client whose unread backlog passes [`MAX_BACKLOG`]
//! is disconnected (logged): it is not reading.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::commands::{self, Context};
use super::{QmpError, failure, line, parse_request, success};
use qmp_proto::{Frame, Framer};

/// Unread bytes queued for one client before it is disconnected.
pub const MAX_BACKLOG: usize = 64 << 20;

/// Longest unix socket path (`sun_path` holds 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// One connected client, as the event thread sees it.
#[derive(Debug)]
struct Client {
    id: u64,
    queue: Queue,
    negotiated: Arc<AtomicBool>,
}

/// A client's outgoing lines and how many bytes of them are unwritten.
#[derive(Debug, Clone)]
struct Queue {
    tx: mpsc::UnboundedSender<Bytes>,
    backlog: Arc<AtomicUsize>,
    kill: CancellationToken,
    id: u64,
}

impl Queue {
    /// Queue `bytes`; false (and the client is cut off) when its backlog
    /// is over [`MAX_BACKLOG`] or it is gone.
    fn push(&self, bytes: Bytes) -> bool {
        let n = bytes.len();
        let total = self.backlog.fetch_add(n, Ordering::Relaxed) + n;
        if total > MAX_BACKLOG {
            if !self.kill.is_cancelled() {
                tracing::warn!(
                    client = self.id,
                    backlog = total,
                    "monitor client {} is not reading: more than {} MiB of replies and events unread; disconnecting it",
                    self.id,
                    MAX_BACKLOG >> 20
                );
                self.kill.cancel();
            }
            return false;
        }
        self.tx.send(bytes).is_ok()
    }
}

/// Every connected client.
#[derive(Debug, Default)]
struct Clients {
    list: Mutex<Vec<Client>>,
    next: AtomicU64,
}

/// The socket path the monitor uses: `--qmp PATH`, none with `--no-qmp`,
/// else the record's path with extension `.qmp` when that fits in a unix
/// socket path.
pub fn monitor_path(qmp: Option<&Path>, no_qmp: bool, record: Option<&Path>) -> Option<PathBuf> {
    if no_qmp {
        return None;
    }
    if let Some(p) = qmp {
        return Some(p.to_owned());
    }
    let p = record?.with_extension("qmp");
    if p.as_os_str().len() > MAX_SOCKET_PATH {
        tracing::info!(
            "no monitor: {} is longer than a unix socket path may be ({MAX_SOCKET_PATH} bytes); pass --qmp PATH",
            p.display()
        );
        return None;
    }
    Some(p)
}

/// Bind the monitor socket at `path`, mode 0600 (it can replace replicas).
/// A socket left by a dead daemon is replaced; a live one is not.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        bail!(
            "monitor socket path {} is longer than {MAX_SOCKET_PATH} bytes",
            path.display()
        );
    }
    crate::cmd::serve::remove_stale_socket(path)?;
    // The socket is created under umask 077 so that nobody else can
    // connect in the moment before the chmod below.
    // SAFETY: umask has no preconditions; it is restored right after.
    let old = unsafe { libc::umask(0o077) };
    let l = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = l.with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod 0600 {}", path.display()))?;
    Ok(l)
}

/// Serve clients on `listener` until `shutdown`; events come from `disk`.
pub fn start(listener: UnixListener, ctx: Arc<Context>, shutdown: CancellationToken) {
    let clients = Arc::new(Clients::default());
    let events = ctx.disk.subscribe();
    let fan = clients.clone();
    let spawned = std::thread::Builder::new()
        .name("quorum-qmp-events".into())
        .spawn(move || {
            // Ends when the disk (its event bus) is dropped.
            while let Ok(e) = events.recv() {
                let text = Bytes::from(line(&super::event(&e, std::time::SystemTime::now())));
                let mut list = fan.list.lock();
                list.retain(|c| {
                    !c.negotiated.load(Ordering::Acquire) || c.queue.push(text.clone())
                });
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "monitor: cannot start the event thread; no events will be sent");
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        tokio::spawn(client(stream, ctx.clone(), clients.clone(), shutdown.clone()));
                    }
                    Err(e) => {
                        // EMFILE and the like: wait for a client to leave.
                        tracing::warn!(error = %e, "monitor: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
            }
        }
    });
}

async fn client(
    stream: UnixStream,
    ctx: Arc<Context>,
    clients: Arc<Clients>,
    shutdown: CancellationToken,
) {
    let id = clients.next.fetch_add(1, Ordering::Relaxed);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let kill = CancellationToken::new();
    let backlog = Arc::new(AtomicUsize::new(0));
    let queue = Queue {
        tx,
        backlog: backlog.clone(),
        kill: kill.clone(),
        id,
    };
    let negotiated = Arc::new(AtomicBool::new(false));
    queue.push(Bytes::from(line(&super::greeting())));
    clients.list.lock().push(Client {
        id,
        queue: queue.clone(),
        negotiated: negotiated.clone(),
    });

    let writer_kill = kill.clone();
    let writer_stop = shutdown.clone();
    let writer = tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                () = writer_kill.cancelled() => break,
                () = writer_stop.cancelled() => break,
                m = rx.recv() => m,
            };
            let Some(bytes) = next else { break };
            let n = bytes.len();
            let wrote = tokio::select! {
                () = writer_kill.cancelled() => break,
                () = writer_stop.cancelled() => break,
                r = wr.write_all(&bytes) => r,
            };
            backlog.fetch_sub(n, Ordering::Relaxed);
            if wrote.is_err() {
                writer_kill.cancel();
                break;
            }
        }
        let _ = wr.shutdown().await;
    });

    let mut framer = Framer::new();
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    'read: loop {
        let n = tokio::select! {
            () = kill.cancelled() => break,
            () = shutdown.cancelled() => break,
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        framer.feed(&buf[..n], &mut frames);
        for f in frames.drain(..) {
            let reply = match f {
                Frame::Text(t) => handle(&t, &ctx, &negotiated).await,
                Frame::Garbage(g) => failure(
                    &QmpError::generic(format!(
                        "JSON parse error, invalid token '{}'",
                        String::from_utf8_lossy(&g[..g.len().min(64)])
                    )),
                    None,
                ),
                Frame::TooLarge(why) => {
                    tracing::warn!(client = id, "monitor client sent a {why}; disconnecting it");
                    queue.push(Bytes::from(line(&failure(
                        &QmpError::generic(format!("JSON parse error, {why}; closing")),
                        None,
                    ))));
                    break 'read;
                }
            };
            if !queue.push(Bytes::from(line(&reply))) {
                break 'read;
            }
        }
    }
    clients.list.lock().retain(|c| c.id != id);
    // The writer sends what is queued (the last error reply), then closes.
    drop(queue);
    let _ = writer.await;
}

/// Reply to one framed request.
async fn handle(text: &[u8], ctx: &Arc<Context>, negotiated: &AtomicBool) -> serde_json::Value {
    let req = match parse_request(text) {
        Ok(r) => r,
        Err((e, id)) => return failure(&e, id),
    };
    let id = req.id.clone();
    if req.execute == "qmp_capabilities" {
        if negotiated.load(Ordering::Acquire) {
            return failure(
                &QmpError::not_found(
                    "Capabilities negotiation is already complete, command 'qmp_capabilities' ignored",
                ),
                id,
            );
        }
        return match commands::check_capabilities_args(&req.arguments) {
            Ok(()) => {
                negotiated.store(true, Ordering::Release);
                success(serde_json::json!({}), id)
            }
            Err(e) => failure(&e, id),
        };
    }
    if !negotiated.load(Ordering::Acquire) {
        return failure(
            &QmpError::not_found(format!(
                "Expecting capabilities negotiation with 'qmp_capabilities' before command '{}'",
                req.execute
            )),
            id,
        );
    }
    let ctx = ctx.clone();
    let name = req.execute;
    let args = req.arguments;
    match tokio::task::spawn_blocking(move || commands::execute(&ctx, &name, &args)).await {
        Ok(Ok(v)) => success(v, id),
        Ok(Err(e)) => failure(&e, id),
        Err(e) => failure(&QmpError::generic(format!("the command failed: {e}")), id),
    }
}

/// The runtime file `<record>.run`: how `quorum status FILE` finds the
/// running daemon.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunFile {
    /// The daemon's PID.
    pub pid: u32,
    /// Its monitor socket, if any.
    pub qmp: Option<PathBuf>,
    /// The NBD URI it exports.
    pub export: String,
}

/// `<record>.run`.
pub fn run_file_path(record: &Path) -> PathBuf {
    let mut s = record.as_os_str().to_owned();
    s.push(".run");
    PathBuf::from(s)
}

impl RunFile {
    /// Write it atomically (temp file, then rename).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let text = serde_json::to_string(self)? + "\n";
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))
    }

    /// Read it; `None` when absent or unreadable.
    pub fn read(path: &Path) -> Option<RunFile> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// The process it names is alive.
    pub fn alive(&self) -> bool {
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks the process exists.
        pid > 0
            && (unsafe { libc::kill(pid, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> (Queue, mpsc::UnboundedReceiver<Bytes>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let q = Queue {
            tx,
            backlog: Arc::new(AtomicUsize::new(0)),
            kill: CancellationToken::new(),
            id: 7,
        };
        (q, rx)
    }

    #[test]
    fn a_client_that_does_not_read_is_cut_off_past_the_backlog_bound() {
        let (q, mut rx) = queue();
        let mib = Bytes::from(vec![b'x'; 1 << 20]);
        for _ in 0..(MAX_BACKLOG >> 20) {
            assert!(q.push(mib.clone()), "cut off below the bound");
        }
        assert!(!q.kill.is_cancelled());
        assert!(!q.push(Bytes::from_static(b"one byte too many")));
        assert!(q.kill.is_cancelled());
        // Nothing was dropped before: every line queued is there, in order.
        let mut n = 0;
        while let Ok(b) = rx.try_recv() {
            assert_eq!(b.len(), 1 << 20);
            n += 1;
        }
        assert_eq!(n, MAX_BACKLOG >> 20);
    }

    #[test]
    fn written_bytes_leave_the_backlog() {
        let (q, _rx) = queue();
        let mib = Bytes::from(vec![b'x'; 1 << 20]);
        for _ in 0..(3 * (MAX_BACKLOG >> 20)) {
            assert!(q.push(mib.clone()));
            // What the writer task does once a line is written.
            q.backlog.fetch_sub(mib.len(), Ordering::Relaxed);
        }
        assert!(!q.kill.is_cancelled());
    }

    #[test]
    fn default_monitor_path_sits_beside_the_record_when_it_fits() {
        let rec = Path::new("/var/lib/quorum/vda-0123456789abcdef.state");
        assert_eq!(
            monitor_path(None, false, Some(rec)),
            Some(PathBuf::from("/var/lib/quorum/vda-0123456789abcdef.qmp"))
        );
        assert_eq!(monitor_path(None, true, Some(rec)), None);
        assert_eq!(monitor_path(None, false, None), None);
        let long = PathBuf::from(format!("/{}/vda.state", "d".repeat(110)));
        assert_eq!(monitor_path(None, false, Some(&long)), None);
        let given = Path::new("/run/q.sock");
        assert_eq!(
            monitor_path(Some(given), false, Some(rec)),
            Some(given.to_owned())
        );
        assert_eq!(
            run_file_path(rec),
            PathBuf::from("/var/lib/quorum/vda-0123456789abcdef.state.run")
        );
    }
}
