//! Hostile monitor clients (garbage, 100 MB of `[`, half an object then a
//! hang-up, 100 clients at once, clients that never read) cost each one its
//! own connection at most: the daemon stays up, other clients are
//! answered, and NBD I/O through the export goes on (qemu-io checks the
//! bytes).

mod support;

use std::io::Write;
use std::os::unix::net::UnixStream;

use serde_json::json;
use support::qmp::Raw;
use support::{Daemon, Disk, Format, Options, qemu_io};

fn start() -> (Disk, Daemon, std::path::PathBuf) {
    let disk = Disk::new(&[Format::Raw; 3], 8 << 20, &Options::default());
    let qmp = disk.file("qmp.sock");
    let d = Daemon::start(&disk, &["--qmp", qmp.to_str().unwrap()]);
    (disk, d, qmp)
}

fn io_works(d: &Daemon, pattern: u8) {
    let w = format!("write -P {pattern:#x} 0 4M");
    let r = format!("read -P {pattern:#x} 0 4M");
    let out = qemu_io(&d.uri, &[&w, &r]);
    assert!(out.ok() && !out.text().contains("failed"), "NBD I/O: {out}");
}

fn still_answers(qmp: &std::path::Path) {
    let mut c = Raw::negotiated(qmp);
    let r = c.command(r#"{"execute":"query-version","id":"alive"}"#);
    assert_eq!(r["id"], "alive", "{r}");
}

#[test]
fn garbage_gets_errors_and_the_stream_resynchronises() {
    let (_disk, d, qmp) = start();
    let mut c = Raw::negotiated(&qmp);
    c.send(b"foo ] \xff\xfe {not json} ");
    for _ in 0..4 {
        let r = c.reply();
        assert_eq!(r["error"]["class"], "GenericError", "{r}");
        assert!(
            r["error"]["desc"]
                .as_str()
                .unwrap()
                .starts_with("JSON parse error"),
            "{r}"
        );
    }
    let r = c.command(r#"{"execute":"query-version","id":1}"#);
    assert_eq!(r["id"], 1, "no resync after garbage: {r}");
    assert!(r["return"].is_object());
    io_works(&d, 0x11);
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn a_flood_of_brackets_closes_that_client_only() {
    let (_disk, d, qmp) = start();
    let mut bystander = Raw::negotiated(&qmp);
    let mut c = Raw::connect(&qmp);
    let _greeting = c.message();
    let mut w = c.stream.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let block = vec![b'['; 1 << 20];
        let mut sent = 0usize;
        for _ in 0..100 {
            if w.write_all(&block).is_err() {
                break; // closed by the daemon, as it should be
            }
            sent += block.len();
        }
        sent
    });
    let r = c.reply();
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("nesting"),
        "{r}"
    );
    assert!(c.closed(), "the connection was not closed");
    let sent = writer.join().expect("writer");
    assert!(sent < 100 << 20, "the daemon read all 100 MB");
    let r = bystander.command(r#"{"execute":"query-version","id":"b"}"#);
    assert_eq!(r["id"], "b");
    // One huge message (a 2 MiB string) is refused the same way.
    let mut big = Raw::negotiated(&qmp);
    let mut text = br#"{"execute":"query-version","id":""#.to_vec();
    text.extend(std::iter::repeat_n(b'x', 2 << 20));
    let mut w = big.stream.try_clone().expect("clone");
    let t = std::thread::spawn(move || {
        let _ = w.write_all(&text);
    });
    let r = big.reply();
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("1 MiB"),
        "{r}"
    );
    assert!(big.closed(), "the connection was not closed");
    t.join().expect("writer");
    io_works(&d, 0x22);
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn half_an_object_then_hang_up() {
    let (_disk, d, qmp) = start();
    for _ in 0..20 {
        let mut c = Raw::negotiated(&qmp);
        c.send(br#"{"execute":"query-quorum","argu"#);
        drop(c);
        // And one that hangs up before reading the greeting.
        drop(UnixStream::connect(&qmp).expect("connect"));
    }
    still_answers(&qmp);
    io_works(&d, 0x33);
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn a_hundred_clients_at_once_while_io_runs() {
    let (_disk, d, qmp) = start();
    // 100 clients that connect and never read or write anything.
    let idle: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&qmp).expect("connect"))
        .collect();
    // 100 busy ones, each with its own thread.
    let busy: Vec<_> = (0..100)
        .map(|i| {
            let qmp = qmp.clone();
            std::thread::spawn(move || {
                let mut c = Raw::negotiated(&qmp);
                for k in 0..5 {
                    let r = c.command(&format!(r#"{{"execute":"query-quorum","id":[{i},{k}]}}"#));
                    assert_eq!(r["id"], json!([i, k]), "{r}");
                    assert_eq!(r["return"]["replicas"].as_array().map(Vec::len), Some(3));
                }
            })
        })
        .collect();
    io_works(&d, 0x44);
    for t in busy {
        t.join().expect("client thread");
    }
    io_works(&d, 0x55);
    drop(idle);
    still_answers(&qmp);
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn a_client_that_never_reads_its_replies_delays_nobody() {
    let (_disk, d, qmp) = start();
    let mut deaf = Raw::negotiated(&qmp);
    // About 10 MB of replies, far more than the socket buffers hold.
    let burst = r#"{"execute":"query-quorum"}"#.repeat(5000);
    let mut w = deaf.stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || w.write_all(burst.as_bytes()).is_ok());
    still_answers(&qmp);
    io_works(&d, 0x66);
    assert!(
        sender.join().expect("sender"),
        "the daemon stopped reading the deaf client"
    );
    // Its replies were queued, not dropped: all 5000 arrive, in order.
    for _ in 0..5000 {
        assert!(deaf.reply()["return"]["replicas"].is_array());
    }
    assert_eq!(d.stop(), Some(0));
}
