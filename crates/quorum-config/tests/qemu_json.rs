//! The QEMU side: `-blockdev` objects and the nested `json:` form.

use std::path::Path;

use quorum_config::{DiskConfig, parse_str, qemu};
use serde_json::{Value, json};

fn disk(replicas: &str, extra: &str) -> DiskConfig {
    let xml = format!(
        "<disk type='quorum'><driver {extra}/><threshold value='1'/>{replicas}<target dev='vda'/></disk>"
    );
    parse_str(&xml, "t.xml", Path::new("/i"), None).unwrap()
}

fn file(fmt: &str, name: &str, inner: &str) -> String {
    format!(
        "<backingStore type='file'><format type='{fmt}'/><source file='{name}'/>{inner}</backingStore>"
    )
}

fn node<'a>(args: &'a [Value], name: &str) -> &'a Value {
    args.iter()
        .find(|a| a["node-name"] == name)
        .unwrap_or_else(|| panic!("no node {name} in {args:#?}"))
}

#[test]
fn raw_replica_is_one_storage_node_named_by_the_quorum() {
    let args = qemu::blockdev_args(&disk(&file("raw", "a.raw", ""), ""));

    assert_eq!(
        args,
        [
            json!({"driver": "file", "filename": "/i/a.raw", "node-name": "quorum-vda-1-storage"}),
            json!({"driver": "quorum", "node-name": "quorum-vda", "vote-threshold": 1,
                   "read-pattern": "quorum", "children": ["quorum-vda-1-storage"]}),
        ]
    );
}

#[test]
fn qcow2_replica_gets_a_format_node_over_its_storage_node() {
    let args = qemu::blockdev_args(&disk(&file("qcow2", "a.qcow2", ""), ""));

    assert_eq!(
        args[1],
        json!({"driver": "qcow2", "node-name": "quorum-vda-1-format", "file": "quorum-vda-1-storage"})
    );
}

#[test]
fn chain_ending_with_empty_backing_store_writes_backing_null() {
    let args = qemu::blockdev_args(&disk(&file("qcow2", "a.qcow2", "<backingStore/>"), ""));

    assert_eq!(node(&args, "quorum-vda-1-format")["backing"], Value::Null);
}

#[test]
fn unspecified_chain_writes_no_backing_key() {
    let args = qemu::blockdev_args(&disk(&file("qcow2", "a.qcow2", ""), ""));

    assert!(node(&args, "quorum-vda-1-format").get("backing").is_none());
}

#[test]
fn raw_backing_layer_is_referenced_by_its_storage_node() {
    let args = qemu::blockdev_args(&disk(
        &file("qcow2", "top.qcow2", &file("raw", "base.raw", "")),
        "",
    ));

    assert_eq!(
        node(&args, "quorum-vda-2-format")["backing"],
        "quorum-vda-1-storage"
    );
}

#[test]
fn backing_layers_come_first_and_are_read_only() {
    let args = qemu::blockdev_args(&disk(
        &file("qcow2", "top.qcow2", &file("raw", "base.raw", "")),
        "",
    ));

    assert_eq!(
        args[0],
        json!({"driver": "file", "filename": "/i/base.raw", "node-name": "quorum-vda-1-storage", "read-only": true})
    );
}

#[test]
fn index_attribute_sets_the_node_number() {
    let xml = file("raw", "a.raw", "").replace("type='file'", "type='file' index='7'");

    let args = qemu::blockdev_args(&disk(&xml, ""));

    assert_eq!(args[0]["node-name"], "quorum-vda-7-storage");
}

#[test]
fn readonly_disk_makes_every_node_read_only() {
    let xml = format!(
        "<disk type='quorum'><threshold value='1'/>{}<target dev='vda'/><readonly/></disk>",
        file("qcow2", "a.qcow2", "")
    );
    let cfg = parse_str(&xml, "t.xml", Path::new("/i"), None).unwrap();

    let args = qemu::blockdev_args(&cfg);

    assert!(args.iter().all(|a| a["read-only"] == true));
}

#[test]
fn quorum_node_carries_rewrite_corrupted_and_fifo() {
    let args = qemu::blockdev_args(&disk(
        &file("raw", "a.raw", ""),
        "read_pattern='fifo' rewrite_corrupted='on'",
    ));

    let q = args.last().unwrap();
    assert_eq!(
        (&q["read-pattern"], &q["rewrite-corrupted"]),
        (&json!("fifo"), &json!(true))
    );
}

#[test]
fn quorum_node_carries_blkverify() {
    let two = format!("{}{}", file("raw", "a.raw", ""), file("raw", "b.raw", ""));
    let xml = format!(
        "<disk type='quorum'><driver blkverify='on'/><threshold value='2'/>{two}<target dev='vda'/></disk>"
    );
    let cfg = parse_str(&xml, "t.xml", Path::new("/i"), None).unwrap();

    let args = qemu::blockdev_args(&cfg);

    assert_eq!(args.last().unwrap()["blkverify"], true);
}

#[test]
fn nbd_tcp_source_becomes_an_inet_server() {
    let xml = "<backingStore type='network'><format type='raw'/><source protocol='nbd' name='e'><host name='h' port='1234'/></source></backingStore>";

    let args = qemu::blockdev_args(&disk(xml, ""));

    assert_eq!(
        args[0],
        json!({"driver": "nbd", "node-name": "quorum-vda-1-storage", "export": "e",
               "server": {"type": "inet", "host": "h", "port": "1234"}})
    );
}

#[test]
fn nbd_unix_source_becomes_a_unix_server() {
    let xml = "<backingStore type='network'><format type='raw'/><source protocol='nbd'><host transport='unix' socket='s.sock'/></source></backingStore>";

    let args = qemu::blockdev_args(&disk(xml, ""));

    assert_eq!(
        args[0]["server"],
        json!({"type": "unix", "path": "/i/s.sock"})
    );
}

#[test]
fn nbd_tls_names_credentials_after_the_node() {
    let xml = "<backingStore type='network'><format type='raw'/><source protocol='nbd' tls='yes'><host name='h'/></source></backingStore>";

    let args = qemu::blockdev_args(&disk(xml, ""));

    assert_eq!(args[0]["tls-creds"], "quorum-vda-1-storage-tls0");
}

#[test]
fn block_source_uses_host_device() {
    let xml =
        "<backingStore type='block'><format type='raw'/><source dev='/dev/sdz'/></backingStore>";

    let args = qemu::blockdev_args(&disk(xml, ""));

    assert_eq!(args[0]["driver"], "host_device");
}

#[test]
fn quorum_node_name_falls_back_when_the_target_is_long() {
    let xml = format!(
        "<disk type='quorum'><threshold value='1'/>{}<target dev='vdabcdefghijklmnopq'/></disk>",
        file("raw", "a.raw", "").replace("type='file'", "type='file' index='4294967295'")
    );
    let cfg = parse_str(&xml, "t.xml", Path::new("/i"), None).unwrap();

    let args = qemu::blockdev_args(&cfg);

    let quorum = qemu::quorum_node_name(&cfg);
    assert!(quorum.starts_with("qrm-"), "{quorum}");
    assert_eq!(quorum, qemu::quorum_node_name(&cfg.clone()), "stable");
    for a in &args {
        let name = a["node-name"].as_str().unwrap();
        assert!(name.len() <= 31, "{name} is longer than QEMU allows");
        assert!(name.starts_with(&quorum), "{name}");
    }
    assert_eq!(args[0]["node-name"], format!("{quorum}-4294967295-storage"));
}

#[test]
fn default_node_names_never_take_libvirts_form() {
    // libvirt names its nodes libvirt-N-storage / libvirt-N-format: QEMU
    // refuses a domain whose nodes repeat a name ("Duplicate nodes").
    let xml = format!(
        "{}{}",
        file("qcow2", "a.qcow2", &file("raw", "base.raw", "")),
        file("raw", "b.raw", "")
    );
    let args = qemu::blockdev_args(&disk(&xml, ""));

    let names: Vec<&str> = args
        .iter()
        .map(|a| a["node-name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "quorum-vda-1-storage",
            "quorum-vda-2-storage",
            "quorum-vda-2-format",
            "quorum-vda-3-storage",
            "quorum-vda"
        ]
    );
    assert!(names.iter().all(|n| !n.starts_with("libvirt")), "{names:?}");
}

#[test]
fn two_quorum_disks_of_one_domain_get_distinct_node_names() {
    let a = disk(&file("raw", "a.raw", ""), "");
    let mut b = a.clone();
    b.target.dev = "vdb".into();

    let na: Vec<Value> = qemu::blockdev_args(&a)
        .iter()
        .map(|n| n["node-name"].clone())
        .collect();
    let nb: Vec<Value> = qemu::blockdev_args(&b)
        .iter()
        .map(|n| n["node-name"].clone())
        .collect();

    assert!(na.iter().all(|n| !nb.contains(n)), "{na:?} {nb:?}");
}

#[test]
fn a_chosen_prefix_names_every_node_and_the_export() {
    let cfg = disk(&file("qcow2", "a.qcow2", ""), "");
    let names = qemu::NodeNames::with_prefix("mine").unwrap();

    let args = qemu::blockdev_args_named(&cfg, &names);
    let qsd =
        qemu::qsd_nbd_export_named(&cfg, &names, &qemu::NbdAddr::Unix("s".into()), "e").unwrap();

    assert_eq!(node(&args, "mine-1-format")["file"], "mine-1-storage");
    assert_eq!(node(&args, "mine")["children"], json!(["mine-1-format"]));
    assert!(qsd[3].contains(",node-name=mine,"), "{qsd:?}");
}

#[test]
fn a_bad_prefix_is_refused_with_the_reason() {
    let e = |p: &str| qemu::NodeNames::with_prefix(p).unwrap_err();

    assert!(
        e("1abc").contains("must start with a letter"),
        "{}",
        e("1abc")
    );
    assert!(e("a b").contains("must start with a letter"));
    assert!(
        e("abcdefghijklm").contains("at most 12 bytes"),
        "{}",
        e("abcdefghijklm")
    );
    assert!(e("libvirt").contains("clash"));
    assert!(e("libvirt-x").contains("clash"));
    assert!(qemu::NodeNames::with_prefix("abcdefghijkl").is_ok());
}

#[test]
fn nested_json_inlines_the_chain() {
    let cfg = disk(
        &file(
            "qcow2",
            "top.qcow2",
            &file("raw", "base.raw", "<backingStore/>"),
        ),
        "",
    );

    let j = qemu::nested_json(&cfg);

    assert_eq!(
        j,
        json!({"driver": "quorum", "vote-threshold": 1, "read-pattern": "quorum", "children": [
            {"driver": "qcow2",
             "file": {"driver": "file", "filename": "/i/top.qcow2"},
             "backing": {"driver": "raw", "read-only": true,
                         "file": {"driver": "file", "filename": "/i/base.raw"}}}
        ]})
    );
}

// ---- one argument per line: argv and qemu-storage-daemon ----

#[test]
fn argv_is_blockdev_then_json_for_every_node_in_order() {
    let cfg = disk(
        &(file("raw", "a,b.raw", "") + &file("qcow2", "c.qcow2", "<backingStore/>")),
        "",
    );
    let nodes = qemu::blockdev_args(&cfg);

    let argv = qemu::argv(&cfg);

    assert_eq!(argv.len(), 2 * nodes.len());
    for (pair, node) in argv.chunks(2).zip(&nodes) {
        assert_eq!(pair[0], "--blockdev");
        assert_eq!(serde_json::from_str::<Value>(&pair[1]).unwrap(), *node);
    }
    assert!(argv.iter().all(|a| !a.contains('\n')));
}

#[test]
fn qsd_export_names_the_quorum_node_and_escapes_commas() {
    let cfg = disk(&file("raw", "a.raw", ""), "");

    let unix =
        qemu::qsd_nbd_export(&cfg, &qemu::NbdAddr::Unix("run/a,b.sock".into()), "vda").unwrap();
    let tcp = qemu::qsd_nbd_export(
        &cfg,
        &qemu::NbdAddr::Inet {
            host: "127.0.0.1".into(),
            port: 10809,
        },
        "x,y",
    )
    .unwrap();

    assert_eq!(
        unix,
        [
            "--nbd-server",
            "addr.type=unix,addr.path=run/a,,b.sock",
            "--export",
            "type=nbd,id=export-vda,node-name=quorum-vda,name=vda,writable=on",
        ]
    );
    assert_eq!(tcp[1], "addr.type=inet,addr.host=127.0.0.1,addr.port=10809");
    assert_eq!(
        tcp[3],
        "type=nbd,id=export-vda,node-name=quorum-vda,name=x,,y,writable=on"
    );
}

#[test]
fn qsd_export_of_a_readonly_disk_is_not_writable_and_newlines_are_refused() {
    let xml = format!(
        "<disk type='quorum'><threshold value='1'/>{}<target dev='vdb'/><readonly/></disk>",
        file("raw", "a.raw", "")
    );
    let cfg = parse_str(&xml, "t.xml", Path::new("/i"), None).unwrap();
    let addr = qemu::NbdAddr::Unix("s.sock".into());

    let args = qemu::qsd_nbd_export(&cfg, &addr, "vdb").unwrap();

    assert!(args[3].ends_with(",writable=off"), "{args:?}");
    assert!(qemu::qsd_nbd_export(&cfg, &addr, "a\nb").is_err());
}
