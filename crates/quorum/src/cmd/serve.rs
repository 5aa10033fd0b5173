//! `quorum serve`: export the voted disk over NBD.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use quorum_engine::{Disk, FileRegion, OpenOptions};
use tokio_util::sync::CancellationToken;

use super::create::create_missing;
use super::util::{human_size, load_disk, parse_size};
use crate::server::{self, Backend, Export, Listener};

/// NBD's registered port.
const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// Export a quorum disk over NBD, for QEMU, qemu-img, qemu-io, nbdinfo,
/// nbdcopy, nbdsh and fio.
///
/// Reads are voted across replicas; writes go to all of them. With neither
/// --socket nor --listen it listens on 127.0.0.1:10809. The export is named
/// after the disk's target dev (e.g. `vda`); the empty default name works too.
/// SIGTERM, SIGINT or SIGHUP stops it cleanly, as they stop qemu-nbd: in-flight
/// requests finish, replicas are flushed and unlocked, the socket and pid
/// file are removed, exit status 0. SIGPIPE is ignored. Logs go to stderr
/// (set RUST_LOG, e.g. RUST_LOG=debug, for more); a closed stdout or stderr
/// loses the text, never a request.
///
/// Examples:
///   quorum serve examples/quorum.xml --create-missing --size 1G
///   quorum serve disk.xml --socket /run/quorum/vda.sock --pid-file /run/quorum/vda.pid
///   qemu-img info 'nbd+unix:///vda?socket=/run/quorum/vda.sock'
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Quorum disk XML (a <disk>, or a <domain> with it in <devices> or in
    /// quorum's <metadata>; `-` reads standard input).
    pub file: PathBuf,
    /// Which disk of a <domain> (its target dev); default: the first quorum disk.
    #[arg(long, value_name = "DEV")]
    pub target: Option<String>,
    /// Listen on this unix socket.
    #[arg(long, value_name = "PATH", conflicts_with = "listen")]
    pub socket: Option<PathBuf>,
    /// Listen on this TCP address (default 127.0.0.1:10809).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,
    /// Export name (default: the disk's target dev).
    #[arg(long, value_name = "NAME")]
    pub export: Option<String>,
    /// Export read-only: replicas are opened read-only with shared locks.
    #[arg(long)]
    pub read_only: bool,
    /// Create missing replica images first (needs --size unless one exists).
    #[arg(long)]
    pub create_missing: bool,
    /// Size of images made by --create-missing (e.g. 10G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "create_missing")]
    pub size: Option<u64>,
    /// Write the daemon's PID here once it accepts clients.
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    /// Run in the background: exit 0 once the socket listens (non-zero with
    /// the error otherwise), as qemu-storage-daemon --daemonize does. stdout
    /// goes to /dev/null, stderr too unless it is a file (`2>>serve.log`).
    #[arg(long)]
    pub daemonize: bool,
    /// With --socket: the socket's permission bits, in octal (e.g. 0660).
    #[arg(long, value_name = "MODE", value_parser = super::daemon::parse_mode, requires = "socket")]
    pub socket_mode: Option<u32>,
    /// With --socket: its owner, USER[:GROUP] or +UID[:+GID] (e.g. libvirt-qemu:kvm).
    #[arg(long, value_name = "OWNER", value_parser = super::daemon::parse_owner, requires = "socket")]
    pub socket_owner: Option<super::daemon::Owner>,
    /// Vote on whole requests, as QEMU's driver does, instead of per 4 KiB block.
    #[arg(long)]
    pub whole_request_vote: bool,
    /// Take no image locks, like QEMU's file.locking=off. Dangerous: nothing
    /// then stops QEMU or another quorum from writing the same replicas.
    /// Meant for benchmarks that share images between daemons.
    #[arg(long)]
    pub no_locking: bool,
    /// When a read whose voted bytes sit unchanged in a raw replica's page
    /// cache is sent from there with sendfile, saving a copy: `auto` on TCP,
    /// and on unix sockets whose send buffer can grow to 1 MiB (see
    /// net.core.wmem_max; with less, copying is faster), `always`, or
    /// `never`. The bytes sent are the voted ones either way; with sendfile
    /// an overlapping write sent while the read's reply is still queued in
    /// the socket may show in that reply, as NBD allows for requests in
    /// flight together.
    #[arg(long, value_name = "WHEN", value_enum, default_value_t = Sendfile::Auto)]
    pub sendfile: Sendfile,
    /// How long a remote (NBD) replica may take to connect or to answer a
    /// request before it counts as failed. A failed replica is not waited
    /// on by later requests; it is retried in the background (after 1 s,
    /// then up to every 30 s) and takes part again once it answers.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0, value_parser = parse_timeout)]
    pub replica_timeout: f64,
    /// Most bytes per second the background resync copies to replicas that
    /// missed writes (e.g. 200M; 0 for no limit). The default leaves most
    /// of a page cache, or of a 10 Gbit/s link, to the guest.
    #[arg(long, value_name = "RATE", value_parser = parse_size, default_value = "200M")]
    pub resync_rate: u64,
    /// Serve Prometheus metrics (text format) on http://HOST:PORT/metrics:
    /// per-replica counters, states, missed bytes, resync and scrub
    /// progress, and latency histograms, read from the same counters as
    /// the monitor's query-quorum. Port 0 picks a free port (printed).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<SocketAddr>,
    /// The monitor (QMP) socket, created mode 0600: whoever can connect
    /// can replace replicas. Default: the record's path with extension
    /// .qmp (none with --no-tracking, or when that path is too long for a
    /// unix socket). `quorum status FILE` finds it. See README, "Monitor (QMP)".
    #[arg(long, value_name = "PATH", conflicts_with = "no_qmp")]
    pub qmp: Option<PathBuf>,
    /// No monitor socket.
    #[arg(long)]
    pub no_qmp: bool,
    #[command(flatten)]
    pub record: super::state::StateArgs,
}

/// A timeout in seconds: positive and finite.
pub fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "'{s}' is not a timeout in seconds (a number above 0, at most 86400)"
        )),
    }
}

/// `--sendfile` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sendfile {
    /// Where the socket's send buffer holds a 1 MiB reply.
    Auto,
    /// On every connection.
    Always,
    /// Copy every reply.
    Never,
}

/// The engine as an NBD backend.
struct DiskBackend {
    /// Shared with the monitor and the metrics endpoint.
    disk: Arc<Disk>,
    /// Moving average of small-request latency, in nanoseconds.
    small_ns: AtomicU64,
}

/// Requests up to this size feed the latency average. Three page-cache
/// copies of 64 KiB take ~30 us here, well under `FAST_NS`; larger ones
/// (and the 128 KiB+ pieces of streamed writes) would measure the copy
/// size, not the storage.
const SMALL: usize = 64 << 10;
/// Below this average latency, small requests count as fast (page cache).
const FAST_NS: u64 = 50_000;

impl DiskBackend {
    fn new(disk: Arc<Disk>) -> Self {
        DiskBackend {
            disk,
            small_ns: AtomicU64::new(0),
        }
    }

    /// Time `f` into the moving average (weight 1/8) when the request is small.
    fn timed<T>(&self, len: usize, f: impl FnOnce() -> T) -> T {
        if len > SMALL {
            return f();
        }
        let start = Instant::now();
        let out = f();
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let old = self.small_ns.load(Ordering::Relaxed);
        self.small_ns
            .store(old - old / 8 + ns / 8, Ordering::Relaxed);
        out
    }
}

impl Backend for DiskBackend {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_only(&self) -> bool {
        self.disk.options().read_only
    }
    fn can_multi_conn(&self) -> bool {
        // Every connection shares one engine, and a flush flushes every replica.
        true
    }
    fn fast_small_requests(&self) -> bool {
        self.small_ns.load(Ordering::Relaxed) < FAST_NS
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        let len = buf.len();
        self.timed(len, || self.disk.read(offset, buf))
            .map_err(|e| e.errno)
    }
    fn read_with_region(&self, offset: u64, buf: &mut [u8]) -> Result<Option<FileRegion>, i32> {
        let len = buf.len();
        self.timed(len, || self.disk.read_with_region(offset, buf))
            .map_err(|e| e.errno)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), i32> {
        self.timed(data.len(), || self.disk.write(offset, data, fua))
            .map_err(|e| e.errno)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> Result<(), i32> {
        self.disk
            .write_zeroes(offset, len, may_unmap, fua)
            .map_err(|e| e.errno)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), i32> {
        self.disk.discard(offset, len).map_err(|e| e.errno)
    }
    fn flush(&self) -> Result<(), i32> {
        self.disk.flush().map_err(|e| e.errno)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool, bool)>, i32> {
        let extents = self.disk.block_status(offset, len).map_err(|e| e.errno)?;
        Ok(extents
            .into_iter()
            .map(|e| (e.length, e.hole, e.zero))
            .collect())
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(code) = super::daemon::daemonize_if(args.daemonize)? {
        return Ok(code);
    }
    crate::output::init_serve_logging();
    let cfg = load_disk(&args.file, args.target.as_deref())?;
    super::validate::log_threshold_warning(&cfg);
    let mut rebuild = Vec::new();
    if args.create_missing {
        // With a record, empty replicas made beside data are rebuilt as new.
        rebuild = create_missing(
            &cfg,
            args.size,
            None,
            !args.record.no_tracking,
            &mut crate::output::lossy_stderr(),
        )?;
    }
    let opts = OpenOptions {
        read_only: args.read_only,
        whole_request_vote: args.whole_request_vote,
        no_locking: args.no_locking,
        replica_timeout: Some(std::time::Duration::from_secs_f64(args.replica_timeout)),
        retry_missing: true,
        state: args.record.path(&cfg),
        resync_rate: args.resync_rate,
        missed_granularity: Some(args.record.missed_granularity),
        rebuild,
    };
    if cfg.driver.rewrite_corrupted && (cfg.readonly || args.read_only) {
        bail!("rewrite_corrupted='on' needs a writable disk; drop --read-only or the option");
    }
    let disk = quorum_engine::open(&cfg, &opts)?;
    let name = args
        .export
        .clone()
        .unwrap_or_else(|| cfg.target.dev.clone());
    let mut summary = format!(
        "{} replicas, threshold {}, {}{}",
        disk.replica_count(),
        cfg.threshold,
        human_size(disk.size()),
        if disk.options().read_only {
            ", read-only"
        } else {
            ""
        }
    );
    let failed = disk.failed_replicas();
    if !failed.is_empty() {
        summary.push_str(&format!(
            ", DEGRADED: {} of {} replicas missing",
            failed.len(),
            disk.replica_count()
        ));
    }
    let disk = Arc::new(disk);
    let backend = Arc::new(DiskBackend::new(disk.clone()));
    let record = args.record.path(&cfg);
    let qmp_path =
        crate::qmp::server::monitor_path(args.qmp.as_deref(), args.no_qmp, record.as_deref());
    let run_file = record.as_deref().map(crate::qmp::server::run_file_path);
    let qmp_ctx = Arc::new(crate::qmp::commands::Context {
        disk: disk.clone(),
        open_opts: opts.clone(),
        base_dir: xml_dir(&args.file),
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(network_threads())
        .max_blocking_threads(256)
        .thread_name("quorum-net")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    // The monitor socket, once bound (removed at stop).
    let mut monitor: Option<PathBuf> = None;
    // The NBD socket, once bound by this process (a socket another server
    // owns is never removed, even when starting fails because of it).
    let mut bound_socket: Option<PathBuf> = None;
    let result = rt.block_on(async {
        // Before the socket and pid file exist: whoever sees them may signal.
        let stop_signals =
            crate::signals::StopSignals::install().context("cannot install signal handlers")?;
        // The monitor listens before the export: whoever sees the NBD
        // socket can ask it.
        let shutdown = CancellationToken::new();
        if let Some(p) = &qmp_path {
            match crate::qmp::server::bind(p) {
                Ok(l) => {
                    crate::qmp::server::start(l, qmp_ctx, shutdown.clone());
                    monitor = Some(std::path::absolute(p).unwrap_or_else(|_| p.clone()));
                }
                Err(e) if args.qmp.is_some() => return Err(e),
                Err(e) => tracing::warn!("no monitor: {e:#}"),
            }
        }
        let (listener, uri) = bind(&args, &name).await?;
        bound_socket = args.socket.clone();
        let metrics_stop = CancellationToken::new();
        let _metrics_guard = metrics_stop.clone().drop_guard();
        let metrics = match args.metrics {
            Some(addr) => Some(crate::metrics::spawn(addr, disk.clone(), metrics_stop).await?),
            None => None,
        };
        if let Some(p) = &run_file {
            let (pid, qmp, export) = (std::process::id(), monitor.clone(), uri.clone());
            crate::qmp::server::RunFile { pid, qmp, export }.write(p)?;
        }
        if let Some(p) = &args.pid_file {
            std::fs::write(p, format!("{}\n", std::process::id()))
                .with_context(|| format!("cannot write pid file {}", p.display()))?;
        }
        super::daemon::ready(args.socket.as_deref(), args.socket_mode, args.socket_owner)?;
        // Nobody may be reading stdout: the text is lost, serving goes on.
        let mut out = crate::output::lossy_stdout();
        let _ = writeln!(out, "quorum: serving {name} ({summary}) at {uri}");
        let _ = writeln!(out, "  connect: qemu-img info '{uri}'");
        let _ = writeln!(
            out,
            "           qemu-system-x86_64 -drive file={uri},format=raw,if=virtio"
        );
        if let Some(p) = &monitor {
            let _ = writeln!(out, "  monitor: quorum status --qmp {}", p.display());
        }
        if let Some(addr) = metrics {
            let _ = writeln!(out, "  metrics: http://{addr}/metrics");
        }
        let _ = writeln!(out, "  stop:    kill -TERM {}", std::process::id());
        for (_, replica, why) in &failed {
            let _ = writeln!(
                out,
                "  missing: {replica}: {why} (retried in the background)"
            );
        }
        let _ = out.flush();

        tokio::spawn(stop_signals.stop_on_signal(shutdown.clone()));
        let export = Export {
            name: name.clone(),
            description: format!("quorum disk {} ({summary})", cfg.target.dev),
            backend: backend.clone(),
        };
        let config = server::ServerConfig {
            zero_copy: match args.sendfile {
                Sendfile::Auto => server::ZeroCopy::Auto,
                Sendfile::Always => server::ZeroCopy::On,
                Sendfile::Never => server::ZeroCopy::Off,
            },
            ..server::ServerConfig::default()
        };
        server::serve_with(listener, vec![export], shutdown, config)
            .await
            .context("NBD server failed")
    });
    // Whatever happened, flush and release the replicas, and leave the
    // record clean.
    let failures = backend.disk.close();
    for (replica, e) in &failures {
        tracing::error!(replica = %replica, error = %e, "final flush failed");
    }
    for p in [&bound_socket, &args.pid_file, &monitor, &run_file]
        .into_iter()
        .flatten()
    {
        let _ = std::fs::remove_file(p);
    }
    result?;
    if !failures.is_empty() {
        bail!("{} replica(s) failed their final flush", failures.len());
    }
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

/// Relative paths in a monitor's `backing-store` resolve against the
/// directory of the disk's XML (the working directory for stdin).
fn xml_dir(file: &Path) -> PathBuf {
    let dir = match file.parent() {
        Some(d) if file != Path::new("-") && !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    std::path::absolute(&dir).unwrap_or(dir)
}

/// One network thread per CPU the process may use, up to 8: on a process
/// confined to one CPU a second thread only adds cross-thread wake-ups.
fn network_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(8))
}

async fn bind(args: &Args, name: &str) -> anyhow::Result<(Listener, String)> {
    if let Some(path) = &args.socket {
        remove_stale_socket(path)?;
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        return Ok((
            Listener::Unix(l),
            format!("nbd+unix:///{name}?socket={}", abs.display()),
        ));
    }
    let addr: SocketAddr = match args.listen {
        Some(a) => a,
        None => DEFAULT_LISTEN.parse().expect("valid default address"),
    };
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = l.local_addr().unwrap_or(addr);
    let host = match local {
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
        SocketAddr::V4(a) => a.ip().to_string(),
    };
    Ok((
        Listener::Tcp(l),
        format!("nbd://{host}:{}/{name}", local.port()),
    ))
}

/// A socket file left by a daemon that died is replaced; a live one is not.
pub(crate) fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!("{} is in use by a running server", path.display());
    }
    std::fs::remove_file(path)
        .with_context(|| format!("cannot remove stale socket {}", path.display()))
}
