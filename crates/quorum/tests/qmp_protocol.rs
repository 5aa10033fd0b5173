//! The monitor speaks QMP as QEMU does, checked over a raw unix socket:
//! greeting, the capabilities gate, id echo, CRLF, argument checking, and
//! a JSON stream whose objects are split across writes or share one.

mod support;

use std::os::unix::fs::PermissionsExt;

use serde_json::{Value, json};
use support::qmp::Raw;
use support::{Daemon, Disk, Format, Options};

fn start() -> (Disk, Daemon, std::path::PathBuf) {
    let disk = Disk::new(&[Format::Raw; 3], 4 << 20, &Options::default());
    let qmp = disk.file("qmp.sock");
    let d = Daemon::start(&disk, &["--qmp", qmp.to_str().unwrap()]);
    (disk, d, qmp)
}

fn class(v: &Value) -> &str {
    v["error"]["class"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {v}"))
}

#[test]
fn greeting_gate_ids_and_crlf() {
    let (_disk, d, qmp) = start();
    let mode = std::fs::metadata(&qmp)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "monitor socket mode {mode:o}");
    let mut c = Raw::connect(&qmp);
    let g = c.message();
    let v = &g["QMP"]["version"];
    for k in ["major", "minor", "micro"] {
        assert!(v["qemu"][k].is_u64(), "greeting {g}");
    }
    assert_eq!(
        v["package"],
        json!(format!("quorum {}", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(g["QMP"]["capabilities"], json!([]));

    // Nothing but qmp_capabilities before negotiation; ids come back as sent.
    let r = c.command(r#"{"execute":"query-version","id":"early"}"#);
    assert_eq!(class(&r), "CommandNotFound", "{r}");
    assert_eq!(r["id"], "early");
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("qmp_capabilities"),
        "{r}"
    );
    let r = c.command(r#"{"execute":"qmp_capabilities","arguments":{},"id":{"n":[1,"x"]}}"#);
    assert_eq!(r, json!({"return": {}, "id": {"n": [1, "x"]}}));
    let r = c.command(r#"{"execute":"qmp_capabilities","id":2}"#);
    assert_eq!(class(&r), "CommandNotFound", "negotiated twice: {r}");

    let r = c.command(r#"{"execute":"query-version","id":3}"#);
    assert_eq!(r["id"], 3);
    assert_eq!(r["return"], g["QMP"]["version"]);
    let r = c.command(r#"{"execute":"query-commands"}"#);
    let names: Vec<&str> = r["return"]
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    for n in [
        "query-quorum",
        "quorum-replica-replace",
        "quorum-scrub",
        "query-scrub",
    ] {
        assert!(names.contains(&n), "{names:?}");
    }
    assert!(r.get("id").is_none(), "no id sent, none echoed: {r}");

    let r = c.command(r#"{"execute":"no-such-command","id":4}"#);
    assert_eq!(class(&r), "CommandNotFound");
    assert_eq!(r["id"], 4);
    let r = c.command(r#"{"execute":"query-quorum","arguments":{"verbose":true},"id":5}"#);
    assert_eq!(class(&r), "GenericError");
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("'verbose'"),
        "{r}"
    );
    let r = c.command(r#"{"execute":"quorum-set-resync-rate","arguments":{"rate":"fast"}}"#);
    assert_eq!(class(&r), "GenericError");
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("'rate'"),
        "{r}"
    );
    let r = c.command(r#"{"execute":"quorum-replica-remove","arguments":{}}"#);
    assert_eq!(class(&r), "GenericError");
    let r = c.command(r#"{"execute":"query-version","bogus":1,"id":6}"#);
    assert_eq!(class(&r), "GenericError");
    assert_eq!(r["id"], 6);
    let r = c.command("[1,2]");
    assert_eq!(class(&r), "GenericError");
    assert_eq!(d.stop(), Some(0));
    assert!(!qmp.exists(), "monitor socket left after stop");
}

#[test]
fn split_objects_and_several_per_write() {
    let (_disk, d, qmp) = start();
    let mut c = Raw::negotiated(&qmp);
    // qemu.qmp's style: compact JSON, no newline, cut anywhere.
    let msg = br#"{"execute":"query-version","id":"s\"}{"}"#;
    for chunk in msg.chunks(7) {
        c.send(chunk);
    }
    let r = c.reply();
    assert_eq!(r["id"], "s\"}{");
    assert!(r["return"]["qemu"].is_object(), "{r}");

    c.send(br#"{"execute":"query-version","id":1}{"execute":"query-scrub","id":2}  {"execute":"nope","id":3}"#);
    let (a, b, e) = (c.reply(), c.reply(), c.reply());
    assert_eq!(
        (&a["id"], &b["id"], &e["id"]),
        (&json!(1), &json!(2), &json!(3))
    );
    assert_eq!(b["return"]["status"], "none", "{b}");
    assert_eq!(class(&e), "CommandNotFound");
    drop(d);
}

#[test]
fn query_quorum_describes_the_disk() {
    let (disk, d, qmp) = start();
    let out = support::qemu_io(&d.uri, &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"]);
    assert!(out.ok() && !out.text().contains("failed"), "{out}");
    let mut c = Raw::negotiated(&qmp);
    let r = c.command(r#"{"execute":"query-quorum"}"#);
    let q = &r["return"];
    assert_eq!(q["size"], json!(disk.size), "{r}");
    assert_eq!(q["threshold"], 2);
    assert_eq!(q["read-pattern"], "quorum");
    for k in [
        "rewrite-corrupted",
        "blkverify",
        "read-only",
        "vote-granularity",
        "resync-rate",
    ] {
        assert!(q["options"].get(k).is_some(), "options.{k}: {r}");
    }
    for op in ["read", "write", "flush"] {
        assert!(q["stats"]["latency"][op]["count"].is_u64(), "{r}");
    }
    let reps = q["replicas"].as_array().expect("replicas");
    assert_eq!(reps.len(), 3);
    for (i, rep) in reps.iter().enumerate() {
        assert_eq!(rep["name"], format!("replica-{i}"));
        assert_eq!(rep["state"], "in-sync", "{rep}");
        assert!(
            rep.get("reason").is_none(),
            "reason only when failed: {rep}"
        );
        for k in [
            "reads",
            "writes",
            "read-errors",
            "write-errors",
            "flush-errors",
            "bad-votes",
            "rewrites",
            "timeouts",
            "skipped",
            "missed-bytes",
        ] {
            assert!(rep.get(k).is_some(), "{k} missing: {rep}");
        }
        for op in ["read", "write", "flush"] {
            let l = &rep["latency"][op];
            assert!(
                l["count"].is_u64() && l.get("mean-ns").is_some() && l.get("p99-ns").is_some(),
                "{rep}"
            );
        }
    }
    drop(d);
}
