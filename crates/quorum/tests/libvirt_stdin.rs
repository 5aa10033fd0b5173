//! Every command reads a whole domain, with the quorum disk in its
//! `<metadata>`, from a file or from standard input (`-`), as in
//! `virsh dumpxml vm | quorum check - --target vda`.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{Disk, Format, Options, QUORUM};

const MIB: u64 = 1 << 20;
const NS: &str = "https://quorum.dev/xmlns/libvirt/1";

/// `disk`'s XML inside a domain's metadata, every element in our namespace
/// under prefix `q` (as `virsh metadata --set --key q` stores it), with the
/// guest-only extras `virsh dumpxml` adds to a disk.
fn domain_xml(disk: &Disk) -> String {
    let d = disk
        .xml_text(&Options::default())
        .replace("<target dev='vda' bus='virtio'/>", "<target dev='vda' bus='virtio'/>\n  <boot order='1'/>\n  <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>")
        .replace("</", "</q:")
        .replace('<', "<q:")
        .replace("<q:/q:", "</q:");
    format!(
        "<domain type='kvm'>\n  <name>demo</name>\n  <metadata>\n    <q:disks xmlns:q='{NS}'>\n\
         <q:export target='vda' socket='/run/quorum/demo/vda.sock'>\n{d}</q:export>\n</q:disks>\n  </metadata>\n\
         <devices>\n<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
         <source protocol='nbd' name='vda'><host transport='unix' socket='/run/quorum/demo/vda.sock'/></source>\
         <target dev='vda' bus='virtio'/></disk>\n</devices>\n</domain>\n"
    )
}

/// Run quorum with `args`, `input` on its stdin; bounded.
fn quorum_stdin(args: &[&str], input: &str) -> support::Output {
    support::run_with_input(
        Command::new(QUORUM).args(args),
        Some(input),
        Duration::from_secs(60),
    )
}

#[test]
fn check_reads_the_domain_from_stdin_and_finds_the_bad_replica() {
    let disk = Disk::raw_filled(3, MIB, 0x5a, &Options::default());
    disk.poke_raw(1, 4096, &[0xff; 512]);

    let out = quorum_stdin(&["check", "-", "--target", "vda"], &domain_xml(&disk));

    assert_eq!(out.code, Some(4), "divergence, not repaired:\n{out}");
    assert!(
        out.text().contains(&disk.path(1).display().to_string()),
        "{out}"
    );
}

#[test]
fn validate_of_stdin_notes_what_it_ignores() {
    let disk = Disk::new(&[Format::Raw, Format::Raw], MIB, &Options::default());

    let out = quorum_stdin(&["validate", "-"], &domain_xml(&disk));

    assert!(out.ok(), "{out}");
    assert_eq!(out.stdout, "vda: quorum of 2 replicas, threshold 2\n");
    assert!(
        out.stderr.contains("<stdin>:") && out.stderr.contains(": note: ignored element <boot>"),
        "{out}"
    );
    assert!(
        out.stderr.contains(": note: ignored element <address>"),
        "{out}"
    );
}

#[test]
fn dumpxml_and_qemu_args_read_the_domain_file_as_well() {
    let disk = Disk::new(&[Format::Raw, Format::Raw], MIB, &Options::default());
    let dom = disk.file("domain.xml");
    std::fs::write(&dom, domain_xml(&disk)).unwrap();

    let from_domain = support::quorum(["dumpxml".as_ref(), dom.as_os_str()]);
    let from_disk = support::quorum(["dumpxml".as_ref(), disk.xml.as_os_str()]);
    let args = support::quorum(["qemu-args".as_ref(), dom.as_os_str(), "--json".as_ref()]);

    assert!(from_domain.ok(), "{from_domain}");
    assert_eq!(from_domain.stdout, from_disk.stdout);
    assert!(
        args.ok() && args.stdout.contains(r#""driver":"quorum""#),
        "{args}"
    );
}

#[test]
fn an_error_read_from_stdin_is_labelled_with_line_and_column() {
    let disk = Disk::new(&[Format::Raw, Format::Raw], MIB, &Options::default());
    let xml = domain_xml(&disk).replace("<q:threshold value='2'/>", "<q:threshold value='9'/>");
    let line = xml.lines().position(|l| l.contains("value='9'")).unwrap() + 1;

    let out = quorum_stdin(&["validate", "-"], &xml);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "<stdin>:{line}:3: unsupported configuration: quorum threshold 9 exceeds the number of replicas (2)"
        )),
        "{out}"
    );
}

#[test]
fn status_reads_the_domain_from_stdin() {
    let disk = Disk::raw_filled(3, MIB, 0x5a, &Options::default());

    let out = quorum_stdin(&["status", "-", "--target", "vda"], &domain_xml(&disk));

    assert!(out.stdout.starts_with("vda:\n"), "{out}");
    assert!(out.stdout.contains("Threshold : 2 of 3 replicas"), "{out}");
    for i in 0..3 {
        assert!(
            out.stdout.contains(&disk.path(i).display().to_string()),
            "{out}"
        );
    }
}
