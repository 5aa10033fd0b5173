//! One test per validation rule: the exact error lines for a small bad document.

use std::path::{Path, PathBuf};

use quorum_config::{Backing, DiskConfig, ImageFormat, NbdHost, ReadPattern, Source, parse_str};

/// A valid three-replica disk; tests derive bad documents from it.
const GOOD: &str = "\
<disk type='quorum' device='disk'>
  <driver name='qemu' type='quorum' read_pattern='quorum' rewrite_corrupted='off'/>
  <threshold value='2'/>
  <backingStore type='file'>
    <format type='qcow2'/>
    <source file='a.qcow2'/>
  </backingStore>
  <backingStore type='file'>
    <format type='raw'/>
    <source file='b.raw'/>
  </backingStore>
  <backingStore type='file'>
    <format type='raw'/>
    <source file='c.raw'/>
  </backingStore>
  <target dev='vda' bus='virtio'/>
</disk>
";

/// A valid two-replica disk for blkverify rules.
const TWO: &str = "\
<disk type='quorum'>
  <driver blkverify='on'/>
  <threshold value='2'/>
  <backingStore type='file'>
    <format type='raw'/>
    <source file='a.raw'/>
  </backingStore>
  <backingStore type='file'>
    <format type='raw'/>
    <source file='b.raw'/>
  </backingStore>
  <target dev='vda'/>
</disk>
";

/// `GOOD` with `from` replaced by `to` (`from` must occur).
fn with(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "pattern {from:?} not in GOOD");
    GOOD.replacen(from, to, 1)
}

fn two_with(from: &str, to: &str) -> String {
    assert!(TWO.contains(from), "pattern {from:?} not in TWO");
    TWO.replacen(from, to, 1)
}

fn parse(xml: &str) -> Result<DiskConfig, quorum_config::ConfigErrors> {
    parse_str(xml, "disk.xml", Path::new("/base"), None)
}

fn errors(xml: &str) -> Vec<String> {
    parse(xml)
        .expect_err("document should be refused")
        .errors()
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn ok(xml: &str) -> DiskConfig {
    parse(xml).unwrap_or_else(|e| panic!("document should be accepted:\n{e}"))
}

// ---- accepted documents ----

#[test]
fn good_document_has_three_replicas_and_threshold_two() {
    let cfg = ok(GOOD);

    assert_eq!((cfg.replicas.len(), cfg.threshold), (3, 2));
}

#[test]
fn relative_paths_resolve_against_base_dir() {
    let cfg = ok(GOOD);

    assert_eq!(
        cfg.replicas[0].source,
        Source::File {
            path: PathBuf::from("/base/a.qcow2")
        }
    );
}

#[test]
fn absolute_paths_are_kept() {
    let cfg = ok(&with("'a.qcow2'", "'/images/a.qcow2'"));

    assert_eq!(
        cfg.replicas[0].source,
        Source::File {
            path: PathBuf::from("/images/a.qcow2")
        }
    );
}

#[test]
fn driver_defaults_apply_without_driver_element() {
    let cfg = ok(&with(
        "  <driver name='qemu' type='quorum' read_pattern='quorum' rewrite_corrupted='off'/>\n",
        "",
    ));

    assert_eq!(
        (
            cfg.driver.read_pattern,
            cfg.driver.rewrite_corrupted,
            cfg.driver.blkverify
        ),
        (ReadPattern::Quorum, false, false)
    );
}

#[test]
fn fifo_read_pattern_is_parsed() {
    let cfg = ok(&with("read_pattern='quorum'", "read_pattern='fifo'"));

    assert_eq!(cfg.driver.read_pattern, ReadPattern::Fifo);
}

#[test]
fn empty_nested_backing_store_ends_the_chain() {
    let cfg = ok(&with(
        "<source file='a.qcow2'/>",
        "<source file='a.qcow2'/><backingStore/>",
    ));

    assert_eq!(cfg.replicas[0].backing, Backing::End);
}

#[test]
fn nested_backing_store_becomes_the_chain() {
    let cfg = ok(&with(
        "<source file='a.qcow2'/>",
        "<source file='a.qcow2'/><backingStore type='file'><format type='raw'/><source file='base.raw'/></backingStore>",
    ));

    let names: Vec<String> = cfg.replicas[0].chain().map(|l| l.display_name()).collect();
    assert_eq!(names, ["/base/a.qcow2", "/base/base.raw"]);
}

#[test]
fn missing_nested_backing_store_leaves_the_chain_unspecified() {
    let cfg = ok(GOOD);

    assert_eq!(cfg.replicas[0].backing, Backing::Unspecified);
}

#[test]
fn shared_backing_base_between_replicas_is_accepted() {
    let base =
        "<backingStore type='file'><format type='raw'/><source file='base.raw'/></backingStore>";
    let xml = with(
        "<source file='a.qcow2'/>",
        &format!("<source file='a.qcow2'/>{base}"),
    )
    .replacen(
        "<format type='raw'/>\n    <source file='b.raw'/>",
        &format!("<format type='qcow2'/><source file='b.qcow2'/>{base}"),
        1,
    );

    let cfg = ok(&xml);

    assert_eq!(cfg.replicas.len(), 3);
}

#[test]
fn nbd_tcp_port_defaults_to_10809() {
    let cfg = ok(&with(
        "<backingStore type='file'>\n    <format type='raw'/>\n    <source file='c.raw'/>",
        "<backingStore type='network'><format type='raw'/><source protocol='nbd' name='r3'><host name='192.0.2.1'/></source>",
    ));

    assert_eq!(
        cfg.replicas[2].source,
        Source::Nbd {
            export: Some("r3".into()),
            host: NbdHost::Tcp {
                name: "192.0.2.1".into(),
                port: 10809
            },
            tls: None
        }
    );
}

#[test]
fn nbd_unix_socket_resolves_against_base_dir() {
    let cfg = ok(&with(
        "<backingStore type='file'>\n    <format type='raw'/>\n    <source file='c.raw'/>",
        "<backingStore type='network'><format type='raw'/><source protocol='nbd' tls='no'><host transport='unix' socket='r3.sock'/></source>",
    ));

    assert_eq!(
        cfg.replicas[2].source,
        Source::Nbd {
            export: None,
            host: NbdHost::Unix {
                socket: "/base/r3.sock".into()
            },
            tls: Some(false)
        }
    );
}

#[test]
fn block_source_is_parsed() {
    let cfg = ok(&with(
        "<backingStore type='file'>\n    <format type='raw'/>\n    <source file='c.raw'/>",
        "<backingStore type='block'><format type='raw'/><source dev='/dev/sdz'/>",
    ));

    assert_eq!(
        cfg.replicas[2].source,
        Source::Block {
            dev: "/dev/sdz".into()
        }
    );
}

#[test]
fn optional_elements_are_kept() {
    let cfg = ok(&with(
        "</disk>",
        "<readonly/><shareable/><serial>S-1</serial><alias name='ua-q'/></disk>",
    ));

    assert_eq!(
        (
            cfg.readonly,
            cfg.shareable,
            cfg.serial.as_deref(),
            cfg.alias.as_deref()
        ),
        (true, true, Some("S-1"), Some("ua-q"))
    );
}

#[test]
fn index_attribute_is_kept() {
    let cfg = ok(&with(
        "<backingStore type='file'>",
        "<backingStore type='file' index='7'>",
    ));

    assert_eq!(cfg.replicas[0].index, Some(7));
}

#[test]
fn single_replica_pass_through_is_accepted() {
    let cfg = ok(&two_with(
        "  <backingStore type='file'>\n    <format type='raw'/>\n    <source file='b.raw'/>\n  </backingStore>\n",
        "",
    )
    .replace("blkverify='on'", "")
    .replace("value='2'", "value='1'"));

    assert_eq!(cfg.replicas[0].format, ImageFormat::Raw);
}

// ---- threshold ----

#[test]
fn missing_threshold_is_an_xml_error() {
    let e = errors(&with("  <threshold value='2'/>\n", ""));

    assert_eq!(e, ["disk.xml:1:1: XML error: missing disk threshold"]);
}

#[test]
fn threshold_without_value_is_an_xml_error() {
    let e = errors(&with("<threshold value='2'/>", "<threshold/>"));

    assert_eq!(e, ["disk.xml:3:3: XML error: missing threshold value"]);
}

#[test]
fn threshold_zero_is_unsupported() {
    let e = errors(&with("value='2'", "value='0'"));

    assert_eq!(
        e,
        ["disk.xml:3:14: unsupported configuration: quorum threshold must be at least 1"]
    );
}

#[test]
fn non_numeric_threshold_is_an_xml_error() {
    let e = errors(&with("value='2'", "value='two'"));

    assert_eq!(
        e,
        ["disk.xml:3:14: XML error: invalid threshold value 'two'"]
    );
}

#[test]
fn negative_threshold_is_an_xml_error() {
    let e = errors(&with("value='2'", "value='-1'"));

    assert_eq!(
        e,
        ["disk.xml:3:14: XML error: invalid threshold value '-1'"]
    );
}

#[test]
fn threshold_above_replica_count_is_unsupported() {
    let e = errors(&with("value='2'", "value='4'"));

    assert_eq!(
        e,
        [
            "disk.xml:3:3: unsupported configuration: quorum threshold 4 exceeds the number of replicas (3)"
        ]
    );
}

#[test]
fn repeated_threshold_is_an_xml_error() {
    let e = errors(&with(
        "<threshold value='2'/>",
        "<threshold value='2'/><threshold value='2'/>",
    ));

    assert_eq!(
        e,
        ["disk.xml:3:25: XML error: element <threshold> is given more than once in <disk>"]
    );
}

// ---- replicas ----

#[test]
fn missing_format_is_an_xml_error() {
    let e = errors(&with("    <format type='qcow2'/>\n", ""));

    assert_eq!(
        e,
        ["disk.xml:4:3: XML error: missing disk backing store format"]
    );
}

#[test]
fn missing_source_is_an_xml_error() {
    let e = errors(&with("    <source file='a.qcow2'/>\n", ""));

    assert_eq!(
        e,
        ["disk.xml:4:3: XML error: missing disk backing store source"]
    );
}

#[test]
fn unknown_format_is_unsupported() {
    let e = errors(&with("type='qcow2'", "type='vmdk'"));

    assert_eq!(
        e,
        [
            "disk.xml:5:13: unsupported configuration: backing store format 'vmdk' is not supported (only 'raw' and 'qcow2')"
        ]
    );
}

#[test]
fn format_without_type_is_an_xml_error() {
    let e = errors(&with("<format type='qcow2'/>", "<format/>"));

    assert_eq!(e, ["disk.xml:5:5: XML error: missing format type"]);
}

#[test]
fn missing_backing_store_type_is_an_xml_error() {
    let e = errors(&with("<backingStore type='file'>", "<backingStore>"));

    assert_eq!(e, ["disk.xml:4:3: XML error: missing backing store type"]);
}

#[test]
fn unknown_backing_store_type_is_an_xml_error() {
    let e = errors(&with(
        "<backingStore type='file'>",
        "<backingStore type='floppy'>",
    ));

    assert_eq!(
        e,
        ["disk.xml:4:17: XML error: unknown backing store type 'floppy'"]
    );
}

#[test]
fn libvirt_volume_backing_store_is_unsupported() {
    let e = errors(&with(
        "<backingStore type='file'>",
        "<backingStore type='volume'>",
    ));

    assert_eq!(
        e,
        [
            "disk.xml:4:17: unsupported configuration: backing store type 'volume' is not supported (only 'file', 'block' and 'network')"
        ]
    );
}

#[test]
fn disk_without_replicas_is_an_xml_error() {
    let e =
        errors("<disk type='quorum'>\n  <threshold value='1'/>\n  <target dev='vda'/>\n</disk>\n");

    assert_eq!(
        e,
        ["disk.xml:1:1: XML error: missing quorum replicas: add at least one <backingStore>"]
    );
}

#[test]
fn empty_backing_store_as_replica_is_an_xml_error() {
    let e = errors(&with("  <target", "  <backingStore/>\n  <target"));

    assert_eq!(
        e,
        ["disk.xml:16:3: XML error: a replica cannot be an empty <backingStore/>"]
    );
}

#[test]
fn raw_layer_with_backing_store_is_unsupported() {
    let e = errors(&with(
        "<source file='b.raw'/>",
        "<source file='b.raw'/><backingStore type='file'><format type='raw'/><source file='z.raw'/></backingStore>",
    ));

    assert_eq!(
        e,
        [
            "disk.xml:10:27: unsupported configuration: a raw image has no backing store; only qcow2 layers can have one"
        ]
    );
}

#[test]
fn backing_chain_deeper_than_limit_is_unsupported() {
    let layer = "<backingStore type='file'><format type='qcow2'/><source file='L{}.qcow2'/>";
    let depth = quorum_config::MAX_CHAIN_DEPTH + 1;
    let open: String = (0..depth)
        .map(|i| layer.replace("{}", &i.to_string()))
        .collect();
    let close = "</backingStore>".repeat(depth);
    let e = errors(&with(
        "<source file='a.qcow2'/>",
        &format!("<source file='a.qcow2'/>{open}{close}"),
    ));

    assert_eq!(e.len(), 1);
    assert!(e[0].ends_with("unsupported configuration: backing chain is deeper than 32 layers"));
}

#[test]
fn invalid_index_is_an_xml_error() {
    let e = errors(&with(
        "<backingStore type='file'>",
        "<backingStore type='file' index='x'>",
    ));

    assert_eq!(
        e,
        ["disk.xml:4:29: XML error: invalid backing store index 'x' (expected a positive integer)"]
    );
}

#[test]
fn zero_index_is_an_xml_error() {
    let e = errors(&with(
        "<backingStore type='file'>",
        "<backingStore type='file' index='0'>",
    ));

    assert_eq!(
        e,
        ["disk.xml:4:29: XML error: invalid backing store index '0' (expected a positive integer)"]
    );
}

#[test]
fn repeated_index_is_an_xml_error() {
    let xml = GOOD.replacen(
        "<backingStore type='file'>",
        "<backingStore type='file' index='1'>",
        2,
    );

    let e = errors(&xml);

    assert_eq!(
        e,
        ["disk.xml:8:29: XML error: backing store index '1' is used more than once"]
    );
}

// ---- duplicate paths ----

#[test]
fn duplicate_replica_paths_are_unsupported() {
    let e = errors(&with("'c.raw'", "'b.raw'"));

    assert_eq!(
        e,
        [
            "disk.xml:14:5: unsupported configuration: replica path '/base/b.raw' is used more than once (first at line 10, column 5)"
        ]
    );
}

#[test]
fn relative_and_absolute_spellings_of_one_path_are_duplicates() {
    let e = errors(&with("'c.raw'", "'/base/b.raw'"));

    assert_eq!(e.len(), 1);
}

#[test]
fn replica_top_layer_as_another_replicas_backing_is_unsupported() {
    let e = errors(&with(
        "<source file='a.qcow2'/>",
        "<source file='a.qcow2'/><backingStore type='file'><format type='raw'/><source file='c.raw'/></backingStore>",
    ));

    assert_eq!(
        e,
        [
            "disk.xml:14:5: unsupported configuration: replica path '/base/c.raw' is used more than once (first at line 6, column 75)"
        ]
    );
}

#[test]
fn duplicate_nbd_exports_are_unsupported() {
    let nbd = "<backingStore type='network'><format type='raw'/><source protocol='nbd' name='x'><host name='h'/></source></backingStore>";
    let e = errors(&with("  <target", &format!("  {nbd}\n  {nbd}\n  <target")));

    assert_eq!(
        e,
        [
            "disk.xml:17:52: unsupported configuration: replica path 'nbd://h:10809/x' is used more than once (first at line 16, column 52)"
        ]
    );
}

// ---- unknown content ----

#[test]
fn unknown_element_in_disk_is_an_xml_error() {
    // <transient/> would change what the replicas hold: not one of the
    // guest-only elements that are ignored with a note.
    let e = errors(&with("  <target", "  <transient/>\n  <target"));

    assert_eq!(
        e,
        ["disk.xml:16:3: XML error: unknown element <transient> in <disk>"]
    );
}

#[test]
fn unknown_element_in_backing_store_is_an_xml_error() {
    let e = errors(&with(
        "<format type='qcow2'/>",
        "<format type='qcow2'/><seclabel/>",
    ));

    assert_eq!(
        e,
        ["disk.xml:5:27: XML error: unknown element <seclabel> in <backingStore>"]
    );
}

#[test]
fn unknown_attribute_on_disk_is_an_xml_error() {
    let e = errors(&with("device='disk'", "device='disk' snapshot='no'"));

    assert_eq!(
        e,
        ["disk.xml:1:35: XML error: unknown attribute 'snapshot' on element <disk>"]
    );
}

#[test]
fn unknown_attribute_on_driver_is_an_xml_error() {
    // Not one of the guest-side options (cache, io, ...) ignored with a note.
    let e = errors(&with("name='qemu'", "name='qemu' bogus='none'"));

    assert_eq!(
        e,
        ["disk.xml:2:23: XML error: unknown attribute 'bogus' on element <driver>"]
    );
}

#[test]
fn text_inside_disk_is_an_xml_error() {
    let e = errors(&with("  <target", "  stray\n  <target"));

    assert_eq!(
        e,
        ["disk.xml:15:18: XML error: unexpected text 'stray' in element <disk>"]
    );
}

// ---- driver ----

#[test]
fn unknown_read_pattern_is_an_xml_error() {
    let e = errors(&with("read_pattern='quorum'", "read_pattern='random'"));

    assert_eq!(
        e,
        ["disk.xml:2:37: XML error: unknown read_pattern 'random' (expected 'quorum' or 'fifo')"]
    );
}

#[test]
fn invalid_on_off_value_is_an_xml_error() {
    let e = errors(&with("rewrite_corrupted='off'", "rewrite_corrupted='yes'"));

    assert_eq!(
        e,
        [
            "disk.xml:2:59: XML error: invalid rewrite_corrupted value 'yes' (expected 'on' or 'off')"
        ]
    );
}

#[test]
fn driver_type_other_than_quorum_is_unsupported() {
    let e = errors(&with(
        "type='quorum' read_pattern",
        "type='raw' read_pattern",
    ));

    assert_eq!(
        e,
        [
            "disk.xml:2:23: unsupported configuration: driver type 'raw' is not supported for a quorum disk, only 'quorum'"
        ]
    );
}

#[test]
fn blkverify_with_two_replicas_and_threshold_two_is_accepted() {
    let cfg = ok(TWO);

    assert!(cfg.driver.blkverify);
}

#[test]
fn blkverify_with_three_replicas_is_unsupported() {
    let e = errors(&with(
        "rewrite_corrupted='off'",
        "rewrite_corrupted='off' blkverify='on'",
    ));

    assert_eq!(
        e,
        [
            "disk.xml:2:83: unsupported configuration: blkverify='on' needs exactly 2 replicas and threshold 2"
        ]
    );
}

#[test]
fn blkverify_with_threshold_one_is_unsupported() {
    let e = errors(&two_with("value='2'", "value='1'"));

    assert_eq!(
        e,
        [
            "disk.xml:2:11: unsupported configuration: blkverify='on' needs exactly 2 replicas and threshold 2"
        ]
    );
}

#[test]
fn blkverify_with_rewrite_corrupted_is_unsupported() {
    let e = errors(&two_with(
        "blkverify='on'",
        "blkverify='on' rewrite_corrupted='on'",
    ));

    assert_eq!(
        e,
        [
            "disk.xml:2:26: unsupported configuration: rewrite_corrupted='on' cannot be used with blkverify='on'"
        ]
    );
}

#[test]
fn readonly_with_rewrite_corrupted_is_unsupported() {
    let xml = with("rewrite_corrupted='off'", "rewrite_corrupted='on'")
        .replace("</disk>", "<readonly/></disk>");

    let e = errors(&xml);

    assert_eq!(
        e,
        [
            "disk.xml:2:59: unsupported configuration: rewrite_corrupted='on' cannot be used on a <readonly/> disk"
        ]
    );
}

// ---- disk, target ----

#[test]
fn disk_type_other_than_quorum_is_unsupported() {
    let e = errors(&with("type='quorum' device", "type='file' device"));

    assert_eq!(
        e,
        ["disk.xml:1:7: unsupported configuration: disk type 'file' is not a quorum disk"]
    );
}

#[test]
fn disk_without_type_is_an_xml_error() {
    let e = errors(&with("type='quorum' device", "device"));

    assert_eq!(e, ["disk.xml:1:1: XML error: missing disk type"]);
}

#[test]
fn device_lun_is_unsupported() {
    let e = errors(&with("device='disk'", "device='lun'"));

    assert_eq!(
        e,
        [
            "disk.xml:1:21: unsupported configuration: disk device 'lun' is not supported for a quorum disk"
        ]
    );
}

#[test]
fn device_cdrom_is_unsupported() {
    let e = errors(&with("device='disk'", "device='cdrom'"));

    assert_eq!(
        e,
        [
            "disk.xml:1:21: unsupported configuration: disk device 'cdrom' is not supported for a quorum disk"
        ]
    );
}

#[test]
fn device_floppy_is_unsupported() {
    let e = errors(&with("device='disk'", "device='floppy'"));

    assert_eq!(
        e,
        [
            "disk.xml:1:21: unsupported configuration: disk device 'floppy' is not supported for a quorum disk"
        ]
    );
}

#[test]
fn unknown_device_is_an_xml_error() {
    let e = errors(&with("device='disk'", "device='tape'"));

    assert_eq!(e, ["disk.xml:1:21: XML error: unknown disk device 'tape'"]);
}

#[test]
fn missing_target_is_an_xml_error() {
    let e = errors(&with("  <target dev='vda' bus='virtio'/>\n", ""));

    assert_eq!(e, ["disk.xml:1:1: XML error: missing disk target"]);
}

#[test]
fn target_without_dev_is_an_xml_error() {
    let e = errors(&with("dev='vda' ", ""));

    assert_eq!(e, ["disk.xml:16:3: XML error: missing target dev"]);
}

#[test]
fn bad_target_dev_is_an_xml_error() {
    let e = errors(&with("dev='vda'", "dev='nvme0'"));

    assert_eq!(
        e,
        [
            "disk.xml:16:11: XML error: invalid target dev 'nvme0': expected a name like 'vda' (fd, hd, sd, vd, xvd or ubd, then letters, digits or '_')"
        ]
    );
}

#[test]
fn target_dev_prefix_alone_is_invalid() {
    assert!(!quorum_config::is_valid_target_dev("vd"));
}

#[test]
fn target_dev_with_punctuation_is_invalid() {
    assert!(!quorum_config::is_valid_target_dev("vda-1"));
}

#[test]
fn target_dev_xvd_with_underscore_is_valid() {
    assert!(quorum_config::is_valid_target_dev("xvdb_1"));
}

// ---- sources ----

#[test]
fn source_attribute_of_another_type_is_an_xml_error() {
    let e = errors(&with(
        "<source file='a.qcow2'/>",
        "<source dev='/dev/sda'/>",
    ));

    assert_eq!(
        e,
        [
            "disk.xml:6:5: XML error: missing source file",
            "disk.xml:6:13: XML error: attribute 'dev' does not belong to a source of type 'file'",
        ]
    );
}

#[test]
fn host_under_a_file_source_is_an_xml_error() {
    let e = errors(&with(
        "<source file='a.qcow2'/>",
        "<source file='a.qcow2'><host name='h'/></source>",
    ));

    assert_eq!(
        e,
        ["disk.xml:6:28: XML error: element <host> does not belong to a source of type 'file'"]
    );
}

#[test]
fn empty_source_path_is_an_xml_error() {
    let e = errors(&with("file='a.qcow2'", "file=''"));

    assert_eq!(e, ["disk.xml:6:13: XML error: empty source file"]);
}

/// `GOOD` with replica 3 replaced by a network source built from `source`.
fn network(source: &str) -> String {
    with(
        "<backingStore type='file'>\n    <format type='raw'/>\n    <source file='c.raw'/>",
        &format!("<backingStore type='network'>\n    <format type='raw'/>\n    {source}"),
    )
}

#[test]
fn network_source_without_host_is_an_xml_error() {
    let e = errors(&network("<source protocol='nbd' name='x'/>"));

    assert_eq!(
        e,
        ["disk.xml:14:5: XML error: missing host in network source"]
    );
}

#[test]
fn network_source_without_protocol_is_an_xml_error() {
    let e = errors(&network("<source><host name='h'/></source>"));

    assert_eq!(
        e,
        ["disk.xml:14:5: XML error: missing network source protocol"]
    );
}

#[test]
fn network_protocol_other_than_nbd_is_unsupported() {
    let e = errors(&network(
        "<source protocol='iscsi'><host name='h'/></source>",
    ));

    assert_eq!(
        e,
        [
            "disk.xml:14:13: unsupported configuration: network protocol 'iscsi' is not supported, only 'nbd'"
        ]
    );
}

#[test]
fn two_hosts_are_unsupported() {
    let e = errors(&network(
        "<source protocol='nbd'><host name='h'/><host name='i'/></source>",
    ));

    assert_eq!(
        e,
        ["disk.xml:14:44: unsupported configuration: an nbd source takes exactly one <host>"]
    );
}

#[test]
fn host_without_name_is_an_xml_error() {
    let e = errors(&network(
        "<source protocol='nbd'><host port='10809'/></source>",
    ));

    assert_eq!(e, ["disk.xml:14:28: XML error: missing host name"]);
}

#[test]
fn non_numeric_port_is_an_xml_error() {
    let e = errors(&network(
        "<source protocol='nbd'><host name='h' port='nbd'/></source>",
    ));

    assert_eq!(
        e,
        ["disk.xml:14:43: XML error: invalid port 'nbd' (expected 1 to 65535)"]
    );
}

#[test]
fn port_above_65535_is_an_xml_error() {
    let e = errors(&network(
        "<source protocol='nbd'><host name='h' port='65536'/></source>",
    ));

    assert_eq!(
        e,
        ["disk.xml:14:43: XML error: invalid port '65536' (expected 1 to 65535)"]
    );
}

#[test]
fn port_zero_is_an_xml_error() {
    let e = errors(&network(
        "<source protocol='nbd'><host name='h' port='0'/></source>",
    ));

    assert_eq!(
        e,
        ["disk.xml:14:43: XML error: invalid port '0' (expected 1 to 65535)"]
    );
}

#[test]
fn unix_host_without_socket_is_an_xml_error() {
    let e = errors(&network(
        "<source protocol='nbd'><host transport='unix'/></source>",
    ));

    assert_eq!(
        e,
        ["disk.xml:14:28: XML error: missing socket for host transport 'unix'"]
    );
}

#[test]
fn unix_host_with_port_is_an_xml_error() {
    let e = errors(&network(
        "<source protocol='nbd'><host transport='unix' socket='s' port='1'/></source>",
    ));

    assert_eq!(
        e,
        [
            "disk.xml:14:62: XML error: attribute 'port' does not belong to a host with transport 'unix'"
        ]
    );
}

#[test]
fn rdma_transport_is_unsupported() {
    let e = errors(&network(
        "<source protocol='nbd'><host transport='rdma' name='h'/></source>",
    ));

    assert_eq!(
        e,
        [
            "disk.xml:14:34: unsupported configuration: host transport 'rdma' is not supported (only 'tcp' and 'unix')"
        ]
    );
}

#[test]
fn invalid_tls_value_is_an_xml_error() {
    let e = errors(&network(
        "<source protocol='nbd' tls='maybe'><host name='h'/></source>",
    ));

    assert_eq!(
        e,
        ["disk.xml:14:28: XML error: invalid tls value 'maybe' (expected 'yes' or 'no')"]
    );
}

// ---- many errors ----

#[test]
fn every_semantic_error_is_reported_in_document_order() {
    let xml = with("value='2'", "value='x'")
        .replacen("type='qcow2'", "type='vmdk'", 1)
        .replacen("dev='vda'", "dev='zz'", 1);

    let e = errors(&xml);

    assert_eq!(
        e,
        [
            "disk.xml:3:14: XML error: invalid threshold value 'x'",
            "disk.xml:5:13: unsupported configuration: backing store format 'vmdk' is not supported (only 'raw' and 'qcow2')",
            "disk.xml:16:11: XML error: invalid target dev 'zz': expected a name like 'vda' (fd, hd, sd, vd, xvd or ubd, then letters, digits or '_')",
        ]
    );
}
