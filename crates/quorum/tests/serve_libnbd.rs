//! `quorum serve` driven by libnbd's tools (nbdinfo, nbdcopy, nbdsh) and
//! fio's nbd engine.

mod support;

use std::process::Command;

use support::{Daemon, Disk, Format, Options, qemu_io, require, run, tool};

const MIB: u64 = 1 << 20;

/// Run a Python snippet in nbdsh connected to `uri` (Debian's python3-libnbd
/// lives under /usr/bin's python3, so that one goes first on PATH).
fn nbdsh(uri: &str, script: &str) -> support::Output {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new(require("nbdsh"))
        .env("PATH", path)
        .args(["-u", uri, "-c", script]))
}

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let out = tool("nbdinfo", ["--json", uri]);
    assert!(out.ok(), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("nbdinfo json");
    v["exports"][0].clone()
}

fn map_lines(uri: &str) -> Vec<(u64, u64, String)> {
    let out = tool("nbdinfo", ["--map", "--json", uri]);
    assert!(out.ok(), "{out}");
    let v: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).expect("map json");
    v.iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["description"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn nbdinfo_list_names_the_target_dev_export() {
    let disk = Disk::new(&[Format::Raw; 3], 4 * MIB, &Options::default());
    let d = Daemon::start(&disk, &[]);

    let out = tool(
        "nbdinfo",
        [
            "--list",
            &format!("nbd+unix:///?socket={}", d.socket.display()),
        ],
    );

    assert!(out.ok(), "{out}");
    assert!(out.stdout.contains("export=\"vda\""), "{out}");
}

#[test]
fn empty_export_name_reaches_the_disk() {
    let disk = Disk::new(&[Format::Raw; 3], 4 * MIB, &Options::default());
    let d = Daemon::start(&disk, &[]);

    let info = nbdinfo_json(&format!("nbd+unix:///?socket={}", d.socket.display()));

    assert_eq!(info["export-size"], 4 * MIB);
}

#[test]
fn nbdinfo_json_reports_size_and_writable_capabilities() {
    let disk = Disk::new(
        &[Format::Qcow2, Format::Raw, Format::Raw],
        6 * MIB,
        &Options::default(),
    );
    let d = Daemon::start(&disk, &[]);

    let info = nbdinfo_json(&d.uri);

    let got = serde_json::json!({
        "export-size": info["export-size"],
        "is_read_only": info["is_read_only"],
        "can_flush": info["can_flush"],
        "can_fua": info["can_fua"],
        "can_trim": info["can_trim"],
        "can_zero": info["can_zero"],
        "can_multi_conn": info["can_multi_conn"],
        "has_base_allocation": info["contexts"]
            .as_array()
            .expect("contexts")
            .iter()
            .any(|c| c == "base:allocation"),
    });
    assert_eq!(
        got,
        serde_json::json!({
            "export-size": 6 * MIB,
            "is_read_only": false,
            "can_flush": true,
            "can_fua": true,
            "can_trim": true,
            "can_zero": true,
            "can_multi_conn": true,
            "has_base_allocation": true,
        })
    );
}

#[test]
fn read_only_export_is_reported_read_only() {
    let disk = Disk::new(&[Format::Raw; 3], 4 * MIB, &Options::default());
    let d = Daemon::start(&disk, &["--read-only"]);

    let info = nbdinfo_json(&d.uri);

    assert_eq!(info["is_read_only"], true);
}

#[test]
fn custom_export_name_is_served() {
    let disk = Disk::new(&[Format::Raw; 3], 4 * MIB, &Options::default());
    let d = Daemon::start(&disk, &["--export", "data0"]);

    let info = nbdinfo_json(&d.uri);

    assert_eq!(info["export-name"], "data0");
}

#[test]
fn nbdinfo_map_shows_holes_where_unallocated_everywhere_and_data_where_written() {
    let disk = Disk::new(
        &[Format::Qcow2, Format::Qcow2, Format::Raw],
        4 * MIB,
        &Options::default(),
    );
    let d = Daemon::start(&disk, &[]);
    let w = qemu_io(&d.uri, &["write -P 0x21 1M 64k"]);
    assert!(w.ok(), "{w}");

    let map = map_lines(&d.uri);

    // qemu-img create allocates a raw file's first 4 KiB, so the raw
    // replica makes that block data: zero only where every replica is.
    assert_eq!(
        map,
        vec![
            (0, 4096, "data".to_owned()),
            (4096, MIB - 4096, "hole,zero".to_owned()),
            (MIB, 65536, "data".to_owned()),
            (MIB + 65536, 3 * MIB - 65536, "hole,zero".to_owned()),
        ]
    );
}

#[test]
fn nbdcopy_export_to_file_copies_the_voted_bytes() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    disk.fill(1, 0x42, 0, 64 * 1024); // outvoted
    let d = Daemon::start(&disk, &[]);
    let dest = disk.file("copy.raw");

    let out = tool("nbdcopy", [d.uri.as_str(), dest.to_str().unwrap()]);

    assert!(out.ok(), "{out}");
    assert!(
        std::fs::read(&dest)
            .expect("copy")
            .iter()
            .all(|&b| b == 0x5a),
        "copy holds bytes other than the majority's 0x5a"
    );
}

#[test]
fn nbdcopy_file_to_export_lands_on_every_replica() {
    let disk = Disk::new(&[Format::Raw; 3], 4 * MIB, &Options::default());
    let src = disk.file("src.raw");
    let data = support::write_seeded_file(&src, (4 * MIB) as usize, 3);
    let d = Daemon::start(&disk, &[]);

    let out = tool("nbdcopy", [src.to_str().unwrap(), d.uri.as_str()]);
    assert!(out.ok(), "{out}");
    assert_eq!(d.stop(), Some(0));

    for i in 0..3 {
        assert!(
            disk.peek_raw(i, 0, data.len()) == data,
            "replica {i} differs"
        );
    }
}

#[test]
fn nbdsh_fua_write_reads_back_and_is_on_every_replica() {
    let disk = Disk::new(&[Format::Raw; 3], 4 * MIB, &Options::default());
    let d = Daemon::start(&disk, &[]);

    let out = nbdsh(
        &d.uri,
        "buf = b'\\xab' * 4096\n\
         h.pwrite(buf, 8192, nbd.CMD_FLAG_FUA)\n\
         assert h.pread(4096, 8192) == buf\n",
    );
    assert!(out.ok(), "{out}");

    for i in 0..3 {
        assert_eq!(
            disk.peek_raw(i, 8192, 4096),
            vec![0xab; 4096],
            "replica {i}"
        );
    }
}

#[test]
fn nbdsh_zero_makes_the_range_read_as_zeroes() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    let d = Daemon::start(&disk, &[]);

    let out = nbdsh(
        &d.uri,
        "h.zero(65536, 4096)\n\
         assert h.pread(65536, 4096) == bytes(65536)\n\
         assert h.pread(4096, 0) == b'\\x5a' * 4096\n",
    );

    assert!(out.ok(), "{out}");
}

#[test]
fn nbdsh_trim_discards_on_the_replicas() {
    let disk = Disk::new(&[Format::Raw; 3], 4 * MIB, &Options::default());
    let d = Daemon::start(&disk, &[]);
    let w = qemu_io(&d.uri, &["write -P 0x21 1M 1M"]);
    assert!(w.ok(), "{w}");

    let out = nbdsh(&d.uri, "h.trim(1048576, 1048576)\nh.flush()\n");
    assert!(out.ok(), "{out}");

    // Only the first 4 KiB stays data: qemu-img create allocated it.
    assert_eq!(
        map_lines(&d.uri),
        vec![
            (0, 4096, "data".to_owned()),
            (4096, 4 * MIB - 4096, "hole,zero".to_owned())
        ]
    );
}

#[test]
fn nbdsh_flush_succeeds() {
    let disk = Disk::new(
        &[Format::Qcow2, Format::Raw, Format::Raw],
        4 * MIB,
        &Options::default(),
    );
    let d = Daemon::start(&disk, &[]);

    let out = nbdsh(&d.uri, "h.pwrite(b'q' * 512, 0)\nh.flush()\n");

    assert!(out.ok(), "{out}");
}

#[test]
fn out_of_range_read_fails_with_einval_and_connection_stays_usable() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    let d = Daemon::start(&disk, &[]);

    // Strict mode off, so libnbd sends the request instead of refusing it itself.
    let out = nbdsh(
        &d.uri,
        "import errno\n\
         h.set_strict_mode(0)\n\
         try:\n    h.pread(8192, 4 * 1024 * 1024 - 4096)\n    raise SystemExit('no error')\n\
         except nbd.Error as e:\n    assert e.errnum == errno.EINVAL, e\n\
         assert h.pread(4096, 0) == b'\\x5a' * 4096\n\
         print('usable')\n",
    );

    assert!(out.ok(), "{out}");
    assert!(out.stdout.contains("usable"), "{out}");
}

#[test]
fn write_to_read_only_export_fails_with_eperm() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    let d = Daemon::start(&disk, &["--read-only"]);

    let out = nbdsh(
        &d.uri,
        "import errno\n\
         h.set_strict_mode(0)\n\
         try:\n    h.pwrite(b'x' * 512, 0)\n    raise SystemExit('no error')\n\
         except nbd.Error as e:\n    assert e.errnum == errno.EPERM, e\n\
         print('refused')\n",
    );
    assert!(out.ok(), "{out}");
    assert_eq!(d.stop(), Some(0));

    assert_eq!(disk.peek_raw(0, 0, 512), vec![0x5a; 512]);
}

fn fio(uri: &str, extra: &[&str]) -> support::Output {
    let mut args = vec![
        "--name=quorum".to_owned(),
        "--ioengine=nbd".to_owned(),
        format!("--uri={uri}"),
        "--verify=crc32c".to_owned(),
        "--do_verify=1".to_owned(),
        "--verify_fatal=1".to_owned(),
        "--verify_state_save=0".to_owned(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    tool("fio", args)
}

#[test]
fn fio_random_read_write_with_crc32c_verify_passes() {
    let disk = Disk::new(
        &[Format::Qcow2, Format::Raw, Format::Raw],
        16 * MIB,
        &Options::default(),
    );
    let d = Daemon::start(&disk, &[]);

    let out = fio(
        &d.uri,
        &["--rw=randrw", "--bs=4k", "--size=16M", "--iodepth=8"],
    );

    assert!(out.ok(), "{out}");
    assert!(!out.text().contains("verify: bad"), "{out}");
}

#[test]
fn fio_sequential_1m_write_then_verify_passes() {
    let disk = Disk::new(&[Format::Raw; 3], 32 * MIB, &Options::default());
    let d = Daemon::start(&disk, &[]);

    let out = fio(
        &d.uri,
        &["--rw=write", "--bs=1M", "--size=32M", "--iodepth=4"],
    );

    assert!(out.ok(), "{out}");
    assert!(!out.text().contains("verify: bad"), "{out}");
}

#[test]
fn unaligned_tail_of_an_odd_sized_disk_reads_the_majority() {
    // 1 MiB + 1000 bytes: the last vote block is partial. qemu-img rounds
    // sizes up to 512, so the files are sized from Rust.
    let size = MIB + 1000;
    let disk = Disk::new(&[Format::Raw; 3], MIB, &Options::default());
    for i in 0..3 {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(disk.path(i))
            .expect("open");
        f.set_len(size).expect("resize");
        disk.poke_raw(i, 0, &vec![0x5a; size as usize]);
    }
    disk.poke_raw(0, size - 10, &[0x11; 10]);
    let d = Daemon::start(&disk, &[]);

    let out = nbdsh(
        &d.uri,
        "assert h.get_size() == 1049576, h.get_size()\n\
         assert h.pread(1500, 1049576 - 1500) == b'\\x5a' * 1500\n",
    );

    assert!(out.ok(), "{out}");
}

#[test]
fn two_clients_writing_disjoint_ranges_at_once_both_land() {
    let disk = Disk::new(&[Format::Raw; 3], 8 * MIB, &Options::default());
    let d = Daemon::start(&disk, &[]);
    let uri = d.uri.clone();
    let uri2 = d.uri.clone();

    let a = std::thread::spawn(move || qemu_io(&uri, &["write -P 0x61 0 4M"]));
    let b = std::thread::spawn(move || qemu_io(&uri2, &["write -P 0x62 4M 4M"]));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert!(a.ok() && b.ok(), "{a}\n{b}");

    let out = qemu_io(&d.uri, &["read -P 0x61 0 4M", "read -P 0x62 4M 4M"]);
    assert_eq!(
        support::result_lines(&out),
        [
            "read 4194304/4194304 bytes at offset 0",
            "read 4194304/4194304 bytes at offset 4194304"
        ],
        "{out}"
    );
}
