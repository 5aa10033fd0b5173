//! `quorum serve --metrics`: the exposition passes Prometheus' own
//! `promtool check metrics`, and its figures are the engine's exact
//! counters after known I/O from qemu-io (one corrupted replica: one bad
//! vote per read that covers it).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{Daemon, Disk, Options, qemu_io, require, run_with_input};

const MIB: u64 = 1 << 20;

/// `GET`/`HEAD` `path` on `addr`: status line and body.
fn http(addr: &str, method: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the reply");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete reply");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// The metrics address serve printed.
fn metrics_addr(disk: &Disk) -> String {
    let out = disk.dir.path().join("serve.out");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("metrics: http://")) {
            let url = l.split_whitespace().nth(1).unwrap();
            return url
                .trim_start_matches("http://")
                .trim_end_matches("/metrics")
                .to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "serve printed no metrics line:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of the sample whose name and labels are exactly `series`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in the exposition"))
        .trim()
        .parse()
        .expect("a number")
}

#[test]
fn promtool_accepts_the_exposition_and_counters_are_exact() {
    let promtool = require("promtool");
    let disk = Disk::raw_filled(3, 8 * MIB, 0x11, &Options::default());
    // The record knows every region (else serve's first comparison would
    // repair the block below before any read sees it).
    let checked = support::quorum(["check", "--repair", disk.xml.to_str().unwrap()]);
    assert!(checked.ok(), "{checked}");
    // Replica 2 differs in one block, behind the daemon's back.
    disk.poke_raw(2, 4096, &[0xee; 4096]);
    let qmp_path = disk.dir.path().join("qmp.sock");
    let d = Daemon::start(
        &disk,
        &[
            "--metrics",
            "127.0.0.1:0",
            "--qmp",
            qmp_path.to_str().unwrap(),
        ],
    );
    let addr = metrics_addr(&disk);

    // Two reads over the bad block, one elsewhere; two writes; one flush.
    let out = qemu_io(
        &d.uri,
        &[
            "read -P 0x11 0 64k",
            "read -P 0x11 0 8k",
            "read -P 0x11 1M 64k",
            "write -P 0x22 2M 64k",
            "write -P 0x23 3M 4k",
            "flush",
        ],
    );
    assert!(out.ok(), "qemu-io: {out}");

    let (status, text) = http(&addr, "GET", "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let checked = run_with_input(
        std::process::Command::new(&promtool).args(["check", "metrics"]),
        Some(&text),
        Duration::from_secs(60),
    );
    assert!(checked.ok(), "promtool check metrics: {checked}\n{text}");
    assert!(
        checked.text().trim().is_empty(),
        "promtool lint findings: {checked}"
    );

    let r = |name: &str, replica: usize| {
        sample(
            &text,
            &format!("quorum_replica_{name}{{disk=\"vda\",replica=\"replica-{replica}\"}}"),
        )
    };
    // One bad vote per read that covered the differing block, only on
    // the replica that lost.
    assert_eq!(r("bad_votes_total", 2), 2.0, "{text}");
    assert_eq!(r("bad_votes_total", 0), 0.0);
    assert_eq!(r("bad_vote_bytes_total", 2), 2.0 * 4096.0);
    assert_eq!(r("read_errors_total", 1), 0.0);
    // Every replica was asked both writes and the flush.
    for i in 0..3 {
        assert_eq!(r("writes_total", i), 2.0, "replica-{i} writes\n{text}");
        assert!(r("flushes_total", i) >= 1.0, "replica-{i} flushes");
        assert_eq!(
            sample(
                &text,
                &format!(
                    "quorum_replica_state{{disk=\"vda\",replica=\"replica-{i}\",state=\"in-sync\"}}"
                )
            ),
            1.0
        );
    }
    assert_eq!(
        sample(&text, "quorum_requests_total{disk=\"vda\",op=\"write\"}"),
        2.0
    );
    assert_eq!(
        sample(
            &text,
            "quorum_request_bytes_total{disk=\"vda\",op=\"write\"}"
        ),
        (64 * 1024 + 4096) as f64
    );
    // A histogram's +Inf bucket holds every request it counted.
    assert_eq!(
        sample(
            &text,
            "quorum_request_duration_seconds_bucket{disk=\"vda\",op=\"write\",le=\"+Inf\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(
            &text,
            "quorum_request_duration_seconds_count{disk=\"vda\",op=\"write\"}"
        ),
        2.0
    );

    // The monitor's query-quorum has the same figures (nothing ran in
    // between).
    let mut q = support::qmp::Qmp::connect(&qmp_path);
    let v = q.ok("query-quorum", serde_json::json!({}));
    for (i, rep) in v["replicas"].as_array().unwrap().iter().enumerate() {
        for (key, metric) in [
            ("reads", "reads_total"),
            ("writes", "writes_total"),
            ("read-errors", "read_errors_total"),
            ("write-errors", "write_errors_total"),
            ("flush-errors", "flush_errors_total"),
            ("bad-votes", "bad_votes_total"),
            ("rewrites", "rewrites_total"),
            ("timeouts", "timeouts_total"),
        ] {
            assert_eq!(
                rep[key].as_u64().map(|n| n as f64),
                Some(r(metric, i)),
                "replica-{i} {key}: {v}"
            );
        }
    }
    assert_eq!(
        v["stats"]["reads"].as_u64().map(|n| n as f64),
        Some(sample(
            &text,
            "quorum_requests_total{disk=\"vda\",op=\"read\"}"
        ))
    );

    // HEAD has no body; other paths and methods are refused.
    let (status, body) = http(&addr, "HEAD", "/metrics");
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", ""));
    assert_eq!(http(&addr, "GET", "/nope").0, "HTTP/1.1 404 Not Found");
    assert_eq!(
        http(&addr, "POST", "/metrics").0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn a_client_that_sends_garbage_or_nothing_does_not_stop_the_endpoint() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0, &Options::default());
    let d = Daemon::start(&disk, &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&disk);
    // A silent client, and one that sends a head larger than the bound.
    let _silent = TcpStream::connect(&addr).unwrap();
    let mut big = TcpStream::connect(&addr).unwrap();
    let _ = big.write_all(&vec![b'x'; 64 << 10]);
    let mut reply = String::new();
    big.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = big.read_to_string(&mut reply);
    assert!(
        reply.starts_with("HTTP/1.1 400"),
        "oversized head: {reply:?}"
    );
    let (status, text) = http(&addr, "GET", "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(text.contains("quorum_disk_replicas{disk=\"vda\"} 3"));
    assert_eq!(d.stop(), Some(0));
}
