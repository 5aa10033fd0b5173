//! Whole documents: malformed XML, the seed example, `<domain>` roots, and files on disk.

use std::path::Path;

use quorum_config::{ErrorKind, load, parse_str};

fn testdata(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

fn first_error(xml: &str) -> String {
    parse_str(xml, "disk.xml", Path::new("/base"), None)
        .expect_err("document should be refused")
        .errors()[0]
        .to_string()
}

const DISK: &str = "<disk type='quorum'><threshold value='1'/><backingStore type='file'><format type='raw'/><source file='{}.raw'/></backingStore><target dev='{}'/></disk>";

fn disk(dev: &str) -> String {
    DISK.replace("{}", dev)
}

fn domain() -> String {
    format!(
        "<domain type='kvm'>\n  <name>guest</name>\n  <devices>\n    <disk type='file'><source file='x'/><target dev='sda'/></disk>\n    {}\n    {}\n  </devices>\n</domain>\n",
        disk("vdb"),
        disk("vdc")
    )
}

// ---- the seed example ----

#[test]
fn seed_as_written_reports_the_unquoted_threshold_first() {
    let path = testdata("seed-as-written.xml");
    let text = std::fs::read_to_string(&path).unwrap();

    let e = parse_str(&text, "disk.xml", &testdata(""), None).unwrap_err();

    assert_eq!(
        e.to_string(),
        "disk.xml:4:14: XML error: attribute value must be quoted (value=2)"
    );
}

#[test]
fn seed_as_written_with_threshold_quoted_reports_the_unclosed_backing_store() {
    let text = std::fs::read_to_string(testdata("seed-as-written.xml"))
        .unwrap()
        .replace("value=2", "value='2'");

    let e = parse_str(&text, "disk.xml", &testdata(""), None).unwrap_err();

    assert_eq!(
        e.to_string(),
        "disk.xml:21:1: XML error: closing tag '</disk>' does not match the open element '<backingStore>'"
    );
}

#[test]
fn seed_corrected_loads_with_three_replicas() {
    let cfg = load(&testdata("seed-corrected.xml"), None).unwrap();

    assert_eq!((cfg.replicas.len(), cfg.threshold), (3, 2));
}

#[test]
fn seed_corrected_keeps_the_nested_chain_of_replica_two() {
    let cfg = load(&testdata("seed-corrected.xml"), None).unwrap();

    let chain: Vec<String> = cfg.replicas[1].chain().map(|l| l.display_name()).collect();
    assert_eq!(
        chain,
        [
            "/var/lib/libvirt/images/file2.qcow2",
            "/var/lib/libvirt/images/base.raw"
        ]
    );
}

// ---- malformed XML ----

#[test]
fn unquoted_attribute_points_at_the_attribute_name() {
    let e = first_error("<disk type=quorum>\n</disk>");

    assert_eq!(
        e,
        "disk.xml:1:7: XML error: attribute value must be quoted (type=quorum)"
    );
}

#[test]
fn unclosed_root_reports_the_end_of_the_document() {
    let e = first_error("<disk type='quorum'>\n  <threshold value='1'/>\n");

    assert_eq!(
        e,
        "disk.xml:3:1: XML error: premature end of data: the root element is not closed"
    );
}

#[test]
fn mismatched_closing_tag_names_both_tags() {
    let e = first_error("<disk>\n  <target>\n</disk>");

    assert_eq!(
        e,
        "disk.xml:3:1: XML error: closing tag '</disk>' does not match the open element '<target>'"
    );
}

#[test]
fn duplicated_attribute_is_reported() {
    let e = first_error("<disk type='quorum' type='file'/>");

    assert_eq!(
        e,
        "disk.xml:1:21: XML error: attribute 'type' is given twice"
    );
}

#[test]
fn empty_document_is_reported() {
    let e = first_error("");

    assert_eq!(
        e,
        "disk.xml:1:1: XML error: document is empty: no root element"
    );
}

#[test]
fn bare_ampersand_is_reported() {
    let e = first_error("<disk><serial>a & b</serial></disk>");

    assert_eq!(
        e,
        "disk.xml:1:17: XML error: malformed entity reference (write '&amp;' for '&')"
    );
}

#[test]
fn dtd_is_refused() {
    let e = first_error("<!DOCTYPE disk [<!ENTITY x 'y'>]><disk/>");

    assert_eq!(
        e,
        "disk.xml:1:1: XML error: document type definitions (DTD) are not accepted"
    );
}

#[test]
fn malformed_document_reports_exactly_one_error() {
    let e = parse_str("<disk a=1 b=2>", "disk.xml", Path::new("/"), None).unwrap_err();

    assert_eq!(e.errors().len(), 1);
}

#[test]
fn wrong_root_element_is_an_xml_error() {
    let e = first_error("<pool/>");

    assert_eq!(
        e,
        "disk.xml:1:1: XML error: root element must be <disk> or <domain>, not <pool>"
    );
}

// ---- <domain> roots and --target ----

#[test]
fn domain_root_picks_the_first_quorum_disk() {
    let cfg = parse_str(&domain(), "d.xml", Path::new("/"), None).unwrap();

    assert_eq!(cfg.target.dev, "vdb");
}

#[test]
fn target_picks_a_disk_of_the_domain() {
    let cfg = parse_str(&domain(), "d.xml", Path::new("/"), Some("vdc")).unwrap();

    assert_eq!(cfg.target.dev, "vdc");
}

#[test]
fn unknown_target_in_domain_is_an_invalid_argument() {
    let e = parse_str(&domain(), "d.xml", Path::new("/"), Some("vdz")).unwrap_err();

    assert_eq!(
        e.to_string(),
        "d.xml:1:1: invalid argument: no disk with target dev 'vdz' in the domain"
    );
}

#[test]
fn target_naming_a_non_quorum_disk_is_unsupported() {
    let e = parse_str(&domain(), "d.xml", Path::new("/"), Some("sda")).unwrap_err();

    assert_eq!(
        e.to_string(),
        "d.xml:4:11: unsupported configuration: disk type 'file' is not a quorum disk"
    );
}

#[test]
fn domain_without_quorum_disk_is_an_xml_error() {
    let e = parse_str(
        "<domain><devices><disk type='file'/></devices></domain>",
        "d.xml",
        Path::new("/"),
        None,
    )
    .unwrap_err();

    assert_eq!(
        e.to_string(),
        "d.xml:1:1: XML error: no <disk type='quorum'> under <devices> in the domain, nor in its <metadata> under namespace 'https://quorum.dev/xmlns/libvirt/1'"
    );
}

#[test]
fn target_on_disk_root_must_match() {
    let e = parse_str(&disk("vda"), "d.xml", Path::new("/"), Some("vdb")).unwrap_err();

    assert_eq!(
        e.to_string(),
        "d.xml:1:1: invalid argument: no disk with target dev 'vdb' in this document"
    );
}

// ---- files ----

#[test]
fn load_resolves_relative_paths_against_the_files_folder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.xml");
    std::fs::write(&path, disk("vda")).unwrap();

    let cfg = load(&path, None).unwrap();

    assert_eq!(
        cfg.replicas[0].display_name(),
        dir.path().join("vda.raw").display().to_string()
    );
}

#[test]
fn load_of_a_missing_file_is_an_io_error() {
    let e = load(Path::new("/nonexistent/disk.xml"), None).unwrap_err();

    assert_eq!(
        e.to_string(),
        "/nonexistent/disk.xml: cannot read file: No such file or directory (os error 2)"
    );
}

#[test]
fn load_of_invalid_utf8_points_at_the_bad_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.xml");
    std::fs::write(&path, b"<disk>\n  <serial>\xff</serial></disk>").unwrap();

    let e = load(&path, None).unwrap_err();

    assert_eq!(
        (e.errors()[0].line, e.errors()[0].col, e.errors()[0].kind),
        (2, 11, ErrorKind::Xml)
    );
}
