//! `domxml to-libvirt` / `from-libvirt`: golden files both ways, the round
//! trip, and the refusals.
//!
//! testdata/libvirt/proposal.xml --to_libvirt--> to-libvirt.golden
//! to-libvirt.golden --from_libvirt--> from-libvirt.golden

use std::path::{Path, PathBuf};

use quorum_config::libvirt::{self, NAMESPACE};
use quorum_config::{parse_str, to_xml};

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/libvirt")
        .join(name)
}

fn read(name: &str) -> String {
    std::fs::read_to_string(testdata(name)).unwrap()
}

fn to(text: &str) -> String {
    libvirt::to_libvirt(
        text,
        "in.xml",
        Path::new("/base"),
        Path::new("/run/quorum"),
        false,
    )
    .unwrap_or_else(|e| panic!("to_libvirt refused:\n{e}"))
}

fn from(text: &str) -> String {
    libvirt::from_libvirt(text, "in.xml", Path::new("/base"))
        .unwrap_or_else(|e| panic!("from_libvirt refused:\n{e}"))
}

fn to_err(text: &str) -> String {
    libvirt::to_libvirt(
        text,
        "in.xml",
        Path::new("/base"),
        Path::new("/run/quorum"),
        false,
    )
    .expect_err("should be refused")
    .to_string()
}

/// Canonical XML of disk `dev` in `text`, as `quorum dumpxml --target` prints it.
fn dumpxml(text: &str, dev: &str) -> String {
    to_xml(&parse_str(text, "x.xml", Path::new("/base"), Some(dev)).unwrap())
}

#[test]
fn to_libvirt_matches_its_golden_file() {
    assert_eq!(to(&read("proposal.xml")), read("to-libvirt.golden"));
}

#[test]
fn from_libvirt_matches_its_golden_file() {
    assert_eq!(
        from(&read("to-libvirt.golden")),
        read("from-libvirt.golden")
    );
}

#[test]
fn round_trip_keeps_every_quorum_disk_as_dumpxml_prints_it() {
    let original = read("proposal.xml");

    let back = from(&to(&original));

    for dev in ["vdb", "sdb"] {
        assert_eq!(dumpxml(&back, dev), dumpxml(&original, dev), "disk {dev}");
    }
}

#[test]
fn to_libvirt_of_from_libvirt_gives_the_libvirt_domain_again() {
    let libvirt_xml = read("to-libvirt.golden");

    assert_eq!(to(&from(&libvirt_xml)), libvirt_xml);
}

#[test]
fn every_quorum_command_reads_the_converted_domain() {
    let original = read("proposal.xml");
    let converted = to(&original);

    for dev in ["vdb", "sdb"] {
        let l =
            quorum_config::parse_str_full(&converted, "c.xml", Path::new("/"), Some(dev)).unwrap();
        assert_eq!(to_xml(&l.disk), dumpxml(&original, dev));
        assert_eq!(
            l.socket,
            Some(PathBuf::from(format!("/run/quorum/quorum-demo/{dev}.sock")))
        );
    }
    assert!(
        !converted.contains("type='quorum'>"),
        "no proposal disk left in <devices>"
    );
}

#[test]
fn relative_paths_become_absolute_and_the_runtime_dir_is_used() {
    let xml = "<domain><name>d</name><devices><disk type='quorum'><threshold value='1'/>\
        <backingStore type='file'><format type='raw'/><source file='img/a.raw'/></backingStore>\
        <target dev='vda'/></disk></devices></domain>";

    let out =
        libvirt::to_libvirt(xml, "in.xml", Path::new("/vm"), Path::new("/tmp/rt"), false).unwrap();

    assert!(
        out.contains("<quorum:source file='/vm/img/a.raw'/>"),
        "{out}"
    );
    assert!(out.contains("socket='/tmp/rt/d/vda.sock'"), "{out}");
    assert!(
        out.contains("<metadata>\n    <quorum:disks xmlns:quorum="),
        "a new <metadata> after <name>: {out}"
    );
}

#[test]
fn an_invalid_quorum_disk_is_reported_at_its_place() {
    let xml = read("proposal.xml").replace("<threshold value='2'/>", "<threshold value='5'/>");

    let e = to_err(&xml);

    assert_eq!(
        e,
        "in.xml:26:7: unsupported configuration: quorum threshold 5 exceeds the number of replicas (3)"
    );
}

#[test]
fn a_converted_domain_is_not_converted_twice() {
    let e = to_err(&read("to-libvirt.golden"));

    assert!(
        e.contains("already carries quorum disks in its <metadata>"),
        "{e}"
    );
}

#[test]
fn refusals_name_the_place_and_the_reason() {
    let no_name = "<domain><devices><disk type='quorum'/></devices></domain>";
    let bad_name = "<domain>\n<name>a/b</name></domain>";
    let no_quorum = "<domain><name>x</name><devices/></domain>";
    let not_domain = "<disk type='quorum'/>";
    let long = format!(
        "<domain><name>{}</name><devices><disk type='quorum'><threshold value='1'/>\
        <backingStore type='file'><format type='raw'/><source file='/a.raw'/></backingStore>\
        <target dev='vda'/></disk></devices></domain>",
        "n".repeat(100)
    );

    assert_eq!(
        to_err(no_name),
        "in.xml:1:1: XML error: missing domain name"
    );
    assert_eq!(
        to_err(bad_name),
        "in.xml:2:1: XML error: domain name 'a/b' cannot name a runtime folder"
    );
    assert_eq!(
        to_err(no_quorum),
        "in.xml:1:1: XML error: no <disk type='quorum'> under <devices> in the domain"
    );
    assert_eq!(
        to_err(not_domain),
        "in.xml:1:1: XML error: root element must be <domain>, not <disk>"
    );
    assert!(to_err(&long).contains("longer than the 107 bytes a unix socket takes"));
    assert!(
        libvirt::from_libvirt(no_quorum, "in.xml", Path::new("/"))
            .unwrap_err()
            .to_string()
            .contains(&format!(
                "no quorum disks in its <metadata> (namespace '{NAMESPACE}')"
            ))
    );
}

#[test]
fn domain_disks_gives_what_the_hook_needs() {
    let xml = read("to-libvirt.golden").replace(
        "  <devices>",
        "  <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+994</label></seclabel>\n  <devices>",
    );

    let d = libvirt::domain_disks(&xml, "d.xml", Path::new("/")).unwrap();

    assert_eq!(d.name, "quorum-demo");
    assert_eq!(
        d.uuid.as_deref(),
        Some("2b5a0b8e-6f61-4b3c-9d0e-8a1f3c6d7e90")
    );
    assert_eq!(d.dac_label.as_deref(), Some("+64055:+994"));
    let targets: Vec<_> = d.exports.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(targets, ["vdb", "sdb"]);
    assert_eq!(
        d.exports[0].socket,
        PathBuf::from("/run/quorum/quorum-demo/vdb.sock")
    );
    assert_eq!(d.exports[1].disk.replicas.len(), 2);

    let plain =
        libvirt::domain_disks(&read("from-libvirt.golden"), "d.xml", Path::new("/")).unwrap();
    assert!(plain.exports.is_empty(), "no metadata: nothing to do");
}
