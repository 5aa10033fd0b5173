//! `quorum serve --metrics HOST:PORT`: Prometheus text exposition on
//! `/metrics`.
//!
//! Nothing is counted here: every scrape takes a snapshot of the engine's
//! own exact counters (`Disk::stats`, `disk_stats`, `replicas_info`,
//! `heal_stats`, `scrub_progress`), the same numbers the monitor's
//! `query-quorum` returns, and encodes them with `prometheus-client`. So the
//! two can never disagree, and the request path pays nothing for metrics.
//!
//! ```text
//!  GET /metrics ──▶ Collector::encode ──▶ snapshot of the disk ──▶ text format 0.0.4
//! ```
//!
//! The HTTP side is the least a scraper needs: HTTP/1.0 and 1.1 `GET` and
//! `HEAD`, one request per connection, headers bounded in size and time.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use quorum_engine::{Disk, LATENCY_BOUNDS_NS, Latency, ReplicaState, ScrubState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Longest request head accepted.
const MAX_HEAD: usize = 8 << 10;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Every state a replica can be in, for the one-hot state gauge.
const STATES: [ReplicaState; 5] = [
    ReplicaState::InSync,
    ReplicaState::Stale,
    ReplicaState::Resyncing,
    ReplicaState::Failed,
    ReplicaState::New,
];

/// Reads the disk's figures at every scrape.
#[derive(Debug)]
struct DiskCollector {
    disk: Arc<Disk>,
}

type Labels<'a> = Vec<(&'static str, Cow<'a, str>)>;

/// Encode one metric family of `samples` (labels, value).
fn family<'a, M: EncodeMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        value.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encode histograms (seconds) from the engine's latency snapshots.
fn histograms<'a>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, &'a Latency)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, lat) in samples {
        // Per-bucket counts: the encoder makes them cumulative.
        let mut buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_NS
            .iter()
            .enumerate()
            .map(|(i, bound)| {
                (
                    *bound as f64 / 1e9,
                    lat.buckets.get(i).copied().unwrap_or(0),
                )
            })
            .collect();
        buckets.push((
            f64::INFINITY,
            lat.buckets
                .get(LATENCY_BOUNDS_NS.len())
                .copied()
                .unwrap_or(0),
        ));
        m.encode_family(&labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                lat.sum_ns as f64 / 1e9,
                lat.count,
                &buckets,
                None,
            )?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: i64) -> ConstGauge<i64> {
    ConstGauge::new(v)
}

fn label<'a>(pairs: &[(&'static str, &'a str)]) -> Labels<'a> {
    pairs.iter().map(|(k, v)| (*k, Cow::Borrowed(*v))).collect()
}

impl Collector for DiskCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let disk = &self.disk;
        let opts = disk.options();
        let stats = disk.stats();
        let infos = disk.replicas_info();
        let ds = disk.disk_stats();

        family(
            &mut enc,
            "quorum_disk_size_bytes",
            "Virtual size of the disk",
            MetricType::Gauge,
            [(vec![], gauge(disk.size() as i64))],
        )?;
        family(
            &mut enc,
            "quorum_disk_threshold",
            "Copies that must agree (reads) or succeed (writes, flushes)",
            MetricType::Gauge,
            [(vec![], gauge(opts.threshold as i64))],
        )?;
        family(
            &mut enc,
            "quorum_disk_replicas",
            "Replicas in the disk",
            MetricType::Gauge,
            [(vec![], gauge(infos.len() as i64))],
        )?;

        // Requests the disk's clients made.
        family(
            &mut enc,
            "quorum_requests",
            "Requests the disk's clients made, by operation",
            MetricType::Counter,
            [
                (label(&[("op", "read")]), counter(ds.reads)),
                (label(&[("op", "write")]), counter(ds.writes)),
                (label(&[("op", "flush")]), counter(ds.flushes)),
            ],
        )?;
        family(
            &mut enc,
            "quorum_request_bytes",
            "Bytes the disk's clients read and wrote",
            MetricType::Counter,
            [
                (label(&[("op", "read")]), counter(ds.read_bytes)),
                (label(&[("op", "write")]), counter(ds.written_bytes)),
            ],
        )?;
        family(
            &mut enc,
            "quorum_request_failures",
            "Requests that failed (no quorum, or too few replicas succeeded)",
            MetricType::Counter,
            [(vec![], counter(ds.failed))],
        )?;
        histograms(
            &mut enc,
            "quorum_request_duration_seconds",
            "Latency of the disk's requests, by operation",
            [
                (label(&[("op", "read")]), &ds.read_latency),
                (label(&[("op", "write")]), &ds.write_latency),
                (label(&[("op", "flush")]), &ds.flush_latency),
            ],
        )?;

        // Per replica.
        type Field = fn(&quorum_engine::ReplicaStats) -> u64;
        let fields: [(&str, &str, Field); 13] = [
            ("reads", "Reads asked of the replica", |s| s.reads),
            (
                "writes",
                "Writes, write-zeroes and discards asked of the replica",
                |s| s.writes,
            ),
            ("flushes", "Flushes asked of the replica", |s| s.flushes),
            ("read_errors", "Reads that failed on the replica", |s| {
                s.read_errors
            }),
            ("write_errors", "Writes that failed on the replica", |s| {
                s.write_errors
            }),
            ("flush_errors", "Flushes that failed on the replica", |s| {
                s.flush_errors
            }),
            (
                "bad_votes",
                "Times the replica was outvoted (a read or scrub range where its copy lost)",
                |s| s.voted_out_reads,
            ),
            (
                "bad_vote_bytes",
                "Bytes in which the replica was outvoted",
                |s| s.voted_out_bytes,
            ),
            (
                "rewrites",
                "Rewrites of outvoted ranges on the replica",
                |s| s.rewrites,
            ),
            ("rewritten_bytes", "Bytes rewritten on the replica", |s| {
                s.rewritten_bytes
            }),
            (
                "rewrite_errors",
                "Rewrites that failed on the replica",
                |s| s.rewrite_errors,
            ),
            ("timeouts", "Requests that timed out on the replica", |s| {
                s.timeouts
            }),
            (
                "skipped",
                "Requests that went without the replica because it was failed",
                |s| s.skipped,
            ),
        ];
        for (field, help, get) in fields {
            family(
                &mut enc,
                &format!("quorum_replica_{field}"),
                help,
                MetricType::Counter,
                stats
                    .iter()
                    .map(|s| (label(&[("replica", &s.node_name)]), counter(get(s)))),
            )?;
        }
        histograms(
            &mut enc,
            "quorum_replica_request_duration_seconds",
            "Latency of the requests asked of each replica, by operation",
            stats.iter().flat_map(|s| {
                [
                    ("read", &s.read_latency),
                    ("write", &s.write_latency),
                    ("flush", &s.flush_latency),
                ]
                .into_iter()
                .map(|(op, l)| (label(&[("replica", &s.node_name), ("op", op)]), l))
            }),
        )?;
        family(
            &mut enc,
            "quorum_replica_state",
            "1 for the replica's current state, 0 for the others",
            MetricType::Gauge,
            infos.iter().flat_map(|r| {
                STATES.iter().map(|s| {
                    (
                        label(&[("replica", &r.name), ("state", s.as_str())]),
                        gauge(i64::from(r.state == *s)),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "quorum_replica_missed_bytes",
            "Bytes the replica missed and is still to receive from the resync",
            MetricType::Gauge,
            infos.iter().filter_map(|r| {
                r.missed_bytes
                    .map(|m| (label(&[("replica", &r.name)]), gauge(m as i64)))
            }),
        )?;
        family(
            &mut enc,
            "quorum_replica_resync_progress_percent",
            "Resync progress of a replica that has missed bytes (0-100)",
            MetricType::Gauge,
            infos.iter().filter_map(|r| {
                r.resync_progress
                    .map(|p| (label(&[("replica", &r.name)]), gauge(i64::from(p))))
            }),
        )?;

        // Resync and scrub.
        family(
            &mut enc,
            "quorum_resync_rate_bytes_per_second",
            "Resync rate limit (0: none)",
            MetricType::Gauge,
            [(vec![], gauge(disk.resync_rate() as i64))],
        )?;
        if let Some(h) = disk.heal_stats() {
            family(
                &mut enc,
                "quorum_resync_bytes",
                "Bytes the resync copied since the daemon started",
                MetricType::Counter,
                [(vec![], counter(h.resync_bytes))],
            )?;
            family(
                &mut enc,
                "quorum_reconciled_bytes",
                "Bytes rewritten while reconciling regions after an unclean stop",
                MetricType::Counter,
                [(vec![], counter(h.reconciled_bytes))],
            )?;
            family(
                &mut enc,
                "quorum_dirty_regions",
                "Regions with writes in flight or not yet cleared in the record",
                MetricType::Gauge,
                [(vec![], gauge(h.dirty_regions as i64))],
            )?;
        }
        let scrub = disk.scrub_progress();
        family(
            &mut enc,
            "quorum_scrub_running",
            "1 while an online scrub runs",
            MetricType::Gauge,
            [(vec![], gauge(i64::from(scrub.state == ScrubState::Running)))],
        )?;
        family(
            &mut enc,
            "quorum_scrub_scanned_bytes",
            "Bytes the current (or last) online scrub scanned",
            MetricType::Gauge,
            [(vec![], gauge(scrub.done_bytes as i64))],
        )?;
        family(
            &mut enc,
            "quorum_scrub_total_bytes",
            "Bytes the current (or last) online scrub has to scan",
            MetricType::Gauge,
            [(vec![], gauge(scrub.total_bytes as i64))],
        )?;
        family(
            &mut enc,
            "quorum_scrub_divergent_ranges",
            "Divergent ranges the current (or last) online scrub found",
            MetricType::Gauge,
            [(vec![], gauge(scrub.divergences.len() as i64))],
        )?;
        Ok(())
    }
}

/// The exposition of `disk`, in Prometheus text format 0.0.4, with every
/// sample labelled `disk=ID`.
pub fn render(disk: &Arc<Disk>) -> String {
    let mut registry = Registry::with_labels(
        [(Cow::Borrowed("disk"), Cow::Owned(disk.options().id.clone()))].into_iter(),
    );
    registry.register_collector(Box::new(DiskCollector { disk: disk.clone() }));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// Listen on `addr`; serve until `stop` is cancelled. Returns the address
/// bound (port 0 picks one) once listening.
pub async fn spawn(
    addr: SocketAddr,
    disk: Arc<Disk>,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((conn, _)) => {
                    let disk = disk.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(conn, disk).await {
                            tracing::debug!(error = %e, "metrics client");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "metrics: accept failed"),
            }
        }
    });
    Ok(bound)
}

/// Answer one HTTP request on `conn`.
async fn answer(mut conn: tokio::net::TcpStream, disk: Arc<Disk>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read_head = async {
        let mut buf = [0u8; 1024];
        loop {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
        }
    };
    let complete = match tokio::time::timeout(HEAD_TIMEOUT, read_head).await {
        Ok(r) => r?,
        Err(_) => false,
    };
    let (status, ctype, body, send_body) = if !complete {
        (
            "400 Bad Request",
            "text/plain",
            "bad request\n".to_owned(),
            true,
        )
    } else {
        let line = head.split(|b| *b == b'\n').next().unwrap_or(&[]);
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("");
        let path = parts.next().unwrap_or("");
        let path = path.split('?').next().unwrap_or("");
        match (method, path) {
            ("GET" | "HEAD", "/metrics") => {
                let d = disk.clone();
                let body = tokio::task::spawn_blocking(move || render(&d))
                    .await
                    .unwrap_or_default();
                (
                    "200 OK",
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    body,
                    method == "GET",
                )
            }
            ("GET" | "HEAD", "/") => (
                "200 OK",
                "text/plain",
                "quorum: metrics are at /metrics\n".to_owned(),
                method == "GET",
            ),
            ("GET" | "HEAD", _) => (
                "404 Not Found",
                "text/plain",
                "not found; metrics are at /metrics\n".to_owned(),
                method == "GET",
            ),
            _ => (
                "405 Method Not Allowed",
                "text/plain",
                "only GET and HEAD\n".to_owned(),
                true,
            ),
        }
    };
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if send_body {
        reply.push_str(&body);
    }
    conn.write_all(reply.as_bytes()).await?;
    conn.shutdown().await
}
