//! Quorum disks kept where stock libvirt keeps them: in a domain's
//! `<metadata>` under our namespace, beside an ordinary NBD frontend disk.

use std::path::{Path, PathBuf};

use quorum_config::libvirt::NAMESPACE;
use quorum_config::{ErrorKind, Loaded, parse_str, parse_str_full, to_xml};

const REPLICAS: &str = "<threshold value='2'/>\
    <backingStore type='file'><format type='raw'/><source file='/i/a.raw'/></backingStore>\
    <backingStore type='file'><format type='raw'/><source file='/i/b.raw'/></backingStore>";

/// A proposal-style disk; every element gets prefix `p` (`p` = "" for none).
fn disk(p: &str, dev: &str) -> String {
    let inner = format!("{REPLICAS}<target dev='{dev}' bus='virtio'/>");
    let inner = if p.is_empty() {
        inner
    } else {
        inner
            .replace('<', &format!("<{p}:"))
            .replace(&format!("<{p}:/"), &format!("</{p}:"))
    };
    let d = if p.is_empty() {
        "disk".to_string()
    } else {
        format!("{p}:disk")
    };
    format!("<{d} type='quorum' device='disk'>{inner}</{d}>")
}

/// A domain as `quorum domxml to-libvirt` writes it: NBD frontends in
/// `<devices>`, the quorum disks in `<metadata>`.
fn domain(metadata: &str) -> String {
    format!(
        "<domain type='kvm'>\n<name>demo</name>\n<metadata>\n\
         <other:app xmlns:other='http://example.org/app'><other:x/></other:app>\n{metadata}\n</metadata>\n\
         <devices>\n\
         <disk type='network' device='disk'><driver name='qemu' type='raw'/>\
         <source protocol='nbd' name='vda'><host transport='unix' socket='/run/quorum/demo/vda.sock'/></source>\
         <target dev='vda' bus='virtio'/></disk>\n\
         </devices>\n</domain>\n"
    )
}

fn exports(prefix: &str, entries: &[(&str, String)]) -> String {
    let mut s = format!("<{prefix}:disks xmlns:{prefix}='{NAMESPACE}'>");
    for (dev, d) in entries {
        s.push_str(&format!(
            "<{prefix}:export target='{dev}' socket='/run/quorum/demo/{dev}.sock'>{d}</{prefix}:export>"
        ));
    }
    s.push_str(&format!("</{prefix}:disks>"));
    s
}

fn full(xml: &str, target: Option<&str>) -> Loaded {
    parse_str_full(xml, "d.xml", Path::new("/base"), target)
        .unwrap_or_else(|e| panic!("refused:\n{e}\n{xml}"))
}

fn errors(xml: &str, target: Option<&str>) -> Vec<String> {
    parse_str(xml, "d.xml", Path::new("/base"), target)
        .expect_err("document should be refused")
        .errors()
        .iter()
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn a_disk_in_metadata_loads_with_its_socket() {
    let xml = domain(&exports("quorum", &[("vda", disk("", "vda"))]));

    let l = full(&xml, None);

    assert_eq!(l.disk.target.dev, "vda");
    assert_eq!(l.disk.replicas.len(), 2);
    assert_eq!(l.socket, Some(PathBuf::from("/run/quorum/demo/vda.sock")));
    assert!(l.notes.is_empty(), "{:?}", l.notes);
}

#[test]
fn elements_in_our_namespace_match_whatever_the_prefix() {
    // `virsh metadata --set --key q` writes every element as <q:...>.
    let plain = full(
        &domain(&exports("quorum", &[("vda", disk("", "vda"))])),
        None,
    );
    let prefixed = full(&domain(&exports("q", &[("vda", disk("q", "vda"))])), None);
    let default_ns = domain(&format!(
        "<disks xmlns='{NAMESPACE}'><export target='vda' socket='/run/quorum/demo/vda.sock'>{}</export></disks>",
        disk("", "vda")
    ));

    assert_eq!(prefixed.disk, plain.disk);
    assert_eq!(full(&default_ns, None).disk, plain.disk);
}

#[test]
fn target_picks_the_export_over_the_frontend_disk_of_the_same_name() {
    let xml = domain(&exports(
        "quorum",
        &[("vdb", disk("", "vdb")), ("vda", disk("", "vda"))],
    ));

    assert_eq!(full(&xml, Some("vda")).disk.target.dev, "vda");
    assert_eq!(full(&xml, Some("vdb")).disk.target.dev, "vdb");
    assert_eq!(full(&xml, None).disk.target.dev, "vdb", "the first export");
    assert_eq!(
        errors(&xml, Some("vdz")),
        ["d.xml:1:1: invalid argument: no disk with target dev 'vdz' in the domain"]
    );
}

#[test]
fn a_proposal_disk_under_devices_comes_before_the_metadata() {
    let xml = domain(&exports("quorum", &[("vdb", disk("", "vdb"))]))
        .replace("</devices>", &format!("{}</devices>", disk("", "vdc")));

    assert_eq!(full(&xml, None).disk.target.dev, "vdc");
}

#[test]
fn our_element_alone_as_virsh_metadata_prints_it() {
    let xml = exports("quorum", &[("vda", disk("", "vda"))]);

    assert_eq!(full(&xml, Some("vda")).disk.target.dev, "vda");
}

#[test]
fn an_error_inside_metadata_points_into_the_domain_file() {
    let xml = domain(&exports(
        "quorum",
        &[("vda", disk("", "vda").replace("value='2'", "value='3'"))],
    ));

    let e = errors(&xml, None);

    let line = xml.lines().position(|l| l.contains("value='3'")).unwrap() + 1;
    let col = xml
        .lines()
        .nth(line - 1)
        .unwrap()
        .find("<threshold")
        .unwrap()
        + 1;
    assert_eq!(
        e,
        [format!(
            "d.xml:{line}:{col}: unsupported configuration: quorum threshold 3 exceeds the number of replicas (2)"
        )]
    );
}

#[test]
fn an_export_whose_target_differs_from_its_disk_is_refused() {
    let xml = domain(&exports("quorum", &[("vda", disk("", "vdb"))]));

    let e = errors(&xml, None);

    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].ends_with("XML error: export target 'vda' does not match its disk's target dev 'vdb'"),
        "{e:?}"
    );
}

#[test]
fn missing_socket_and_missing_disk_are_reported() {
    let xml = domain(&format!(
        "<q:disks xmlns:q='{NAMESPACE}'><q:export target='vda'/></q:disks>"
    ));

    let e = errors(&xml, None);

    assert!(
        e.iter()
            .any(|e| e.ends_with("XML error: missing export socket")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|e| e.ends_with("XML error: missing <disk> in <export>")),
        "{e:?}"
    );
}

#[test]
fn two_elements_of_our_namespace_in_metadata_are_refused() {
    let one = exports("quorum", &[("vda", disk("", "vda"))]);
    let xml = domain(&format!(
        "{one}\n{}",
        exports("q", &[("vdb", disk("", "vdb"))])
    ));

    let e = errors(&xml, None);

    assert!(
        e[0].contains("XML error: more than one element in namespace 'https://quorum.dev/xmlns/libvirt/1' in <metadata>"),
        "{e:?}"
    );
}

#[test]
fn a_target_exported_twice_is_refused() {
    let xml = domain(&exports(
        "quorum",
        &[("vda", disk("", "vda")), ("vda", disk("", "vda"))],
    ));

    let e = errors(&xml, None);

    assert!(
        e.iter()
            .any(|e| e.contains("target 'vda' has more than one <export>")),
        "{e:?}"
    );
}

#[test]
fn an_unknown_element_of_ours_is_still_an_error() {
    let xml = domain(&exports(
        "q",
        &[(
            "vda",
            disk("q", "vda").replace("<q:target", "<q:transient/><q:target"),
        )],
    ));

    let e = errors(&xml, None);

    assert!(
        e.iter()
            .any(|e| e.ends_with("XML error: unknown element <transient> in <disk>")),
        "{e:?}"
    );
}

#[test]
fn our_namespace_outside_metadata_is_not_ours() {
    // A proposal disk under <devices> is libvirt's vocabulary: no namespaces.
    let xml = format!(
        "<domain><devices><disk type='quorum' xmlns:q='{NAMESPACE}'>{REPLICAS}<q:target dev='vda'/></disk></devices></domain>"
    );

    let e = errors(&xml, None);

    assert!(
        e.iter()
            .any(|e| e.ends_with("XML error: unknown element <target> in <disk>")),
        "{e:?}"
    );
}

#[test]
fn guest_only_elements_and_attributes_are_ignored_with_a_note() {
    // What `virsh dumpxml` adds to a disk, or a user copies from it.
    let plain = disk("", "vda");
    let dumped = plain
        .replace(
            "<threshold",
            "<driver name='qemu' type='quorum' cache='none' io='native' discard='unmap' detect_zeroes='off'/><threshold",
        )
        .replace(
            "<target dev='vda' bus='virtio'/>",
            "<target dev='vda' bus='virtio'/><boot order='1'/><alias name='ua-quorum-vda'/>\
             <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>",
        );

    let l = parse_str_full(&dumped, "d.xml", Path::new("/base"), None).unwrap();
    let base = parse_str(&plain, "d.xml", Path::new("/base"), None).unwrap();

    let notes: Vec<String> = l.notes.iter().map(|n| n.to_string()).collect();
    assert!(l.notes.iter().all(|n| n.kind == ErrorKind::Note));
    assert_eq!(notes.len(), 6, "{notes:#?}");
    assert!(notes[0].starts_with("d.xml:1:"), "{notes:?}");
    assert!(
        notes[0].ends_with(
            "note: ignored attribute 'cache' of <driver>: it concerns the guest or QEMU, not the replicas"
        ),
        "{notes:?}"
    );
    assert!(notes.iter().any(|n| n.ends_with(
        "note: ignored element <boot>: it concerns the guest or QEMU, not the replicas"
    )));
    assert!(
        notes
            .iter()
            .any(|n| n.contains("ignored element <address>"))
    );
    // Ignored means ignored: the disk is the one without them (the alias is kept).
    let mut expected = base.clone();
    expected.driver.name = Some("qemu".into());
    expected.alias = Some("ua-quorum-vda".into());
    assert_eq!(l.disk, expected);
    assert!(!to_xml(&l.disk).contains("cache"));
}

#[test]
fn other_applications_metadata_is_left_alone() {
    // domain() always carries <other:app>; a domain with only that has no disk.
    let xml = domain("");

    let e = errors(&xml, None);

    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains(
            "no <disk type='quorum'> under <devices> in the domain, nor in its <metadata>"
        ),
        "{e:?}"
    );
}

#[test]
fn our_element_as_virsh_metadata_prints_it_without_namespace() {
    let xml = format!(
        "<disks>\n<export target='vda' socket='/run/quorum/demo/vda.sock'>{}</export>\n</disks>\n",
        disk("", "vda")
    );

    let l = full(&xml, Some("vda"));

    assert_eq!(l.socket, Some(PathBuf::from("/run/quorum/demo/vda.sock")));
}
