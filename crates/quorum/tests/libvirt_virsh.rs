//! Real libvirt judges what `quorum domxml to-libvirt` writes: its schema
//! (`virt-xml-validate`) and its parser (`virsh define --validate` on the
//! in-process test driver, no daemon). The domain libvirt then prints still
//! carries our metadata, which quorum reads from a pipe.
//!
//! Needs virsh and virt-xml-validate (Debian: libvirt-clients) and xmllint
//! (libxml2-utils); fails if missing.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{QUORUM, require};

/// The test driver keeps its domains per process: define and dumpxml run
/// in one virsh.
const TEST_URI: &str = "test:///default";

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../quorum-config/testdata/libvirt")
        .join(name)
}

/// Run `program args` with `input` on stdin, bounded.
fn run_with_stdin(program: &Path, args: &[&str], input: &str) -> support::Output {
    support::run_with_input(
        Command::new(program).args(args),
        Some(input),
        Duration::from_secs(60),
    )
}

/// `quorum domxml to-libvirt proposal.xml`, written to a temp file.
fn converted() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = support::quorum([
        "domxml".as_ref(),
        "to-libvirt".as_ref(),
        testdata("proposal.xml").as_os_str(),
    ]);
    assert!(out.ok(), "{out}");
    let path = dir.path().join("vm.xml");
    std::fs::write(&path, &out.stdout).unwrap();
    (dir, path)
}

/// `virsh -c test:///default 'define --validate FILE; dumpxml NAME'`; the
/// dumped domain, from its `<domain` on, or virsh's output when it failed.
fn define_and_dump(file: &Path, name: &str) -> Result<String, support::Output> {
    let script = format!("define --validate {}; dumpxml {name}", file.display());
    let out = support::tool("virsh", ["-q", "-c", TEST_URI, &script]);
    match out.stdout.find("<domain") {
        Some(at) if out.ok() => Ok(out.stdout[at..].to_string()),
        _ => Err(out),
    }
}

fn quorum_stdin(args: &[&str], input: &str) -> support::Output {
    run_with_stdin(Path::new(QUORUM), args, input)
}

#[test]
fn to_libvirt_output_passes_libvirts_schema_and_the_proposal_does_not() {
    let (_dir, vm) = converted();

    let ok = support::tool("virt-xml-validate", [vm.as_os_str(), "domain".as_ref()]);
    let refused = support::tool(
        "virt-xml-validate",
        [testdata("proposal.xml").as_os_str(), "domain".as_ref()],
    );

    assert!(ok.ok(), "{ok}");
    assert!(
        !refused.ok(),
        "the schema must refuse type='quorum': {refused}"
    );
}

#[test]
fn virsh_defines_the_converted_domain_and_keeps_our_metadata() {
    require("virsh");
    let (_dir, vm) = converted();

    let dumped = define_and_dump(&vm, "quorum-demo").unwrap_or_else(|o| panic!("{o}"));

    assert!(
        dumped.contains("<quorum:disks xmlns:quorum=\"https://quorum.dev/xmlns/libvirt/1\">"),
        "{dumped}"
    );
    assert!(dumped.contains("<alias name='ua-quorum-vdb'/>"), "{dumped}");
    assert!(
        dumped.contains("<host transport='unix' socket='/run/quorum/quorum-demo/vdb.sock'/>"),
        "{dumped}"
    );
}

#[test]
fn virsh_refuses_the_proposal_itself() {
    // The control for the test above: define --validate does judge disks.
    let out = support::tool(
        "virsh",
        [
            "-q",
            "-c",
            TEST_URI,
            &format!("define --validate {}", testdata("proposal.xml").display()),
        ],
    );

    assert!(!out.ok(), "{out}");
}

#[test]
fn quorum_reads_the_disks_from_what_virsh_dumpxml_prints() {
    let (_dir, vm) = converted();
    let dumped = define_and_dump(&vm, "quorum-demo").unwrap_or_else(|o| panic!("{o}"));

    let vdb = quorum_stdin(&["validate", "-", "--target", "vdb"], &dumped);
    let sdb = quorum_stdin(&["dumpxml", "-", "--target", "sdb"], &dumped);
    let expected = support::quorum([
        "dumpxml".as_ref(),
        testdata("proposal.xml").as_os_str(),
        "--target".as_ref(),
        "sdb".as_ref(),
    ]);

    assert!(vdb.ok(), "{vdb}");
    assert_eq!(vdb.stdout, "vdb: quorum of 3 replicas, threshold 2\n");
    assert!(sdb.ok(), "{sdb}");
    assert_eq!(sdb.stdout, expected.stdout);
}

#[test]
fn from_libvirt_of_virshs_domain_gives_back_every_quorum_disk() {
    let (_dir, vm) = converted();
    let dumped = define_and_dump(&vm, "quorum-demo").unwrap_or_else(|o| panic!("{o}"));

    let back = quorum_stdin(&["domxml", "from-libvirt", "-"], &dumped);

    assert!(back.ok(), "{back}");
    assert!(!back.stdout.contains("quorum:disks"), "{}", back.stdout);
    for dev in ["vdb", "sdb"] {
        let got = quorum_stdin(&["dumpxml", "-", "--target", dev], &back.stdout);
        let want = support::quorum([
            "dumpxml".as_ref(),
            testdata("proposal.xml").as_os_str(),
            "--target".as_ref(),
            dev.as_ref(),
        ]);
        assert!(got.ok(), "{got}");
        assert_eq!(got.stdout, want.stdout, "disk {dev}");
    }
}

#[test]
fn define_converts_and_virsh_accepts_what_it_refuses_unconverted() {
    require("virsh");

    let out = support::quorum([
        "define".as_ref(),
        testdata("proposal.xml").as_os_str(),
        "--connect".as_ref(),
        TEST_URI.as_ref(),
    ]);

    // virsh_refuses_the_proposal_itself shows the same file is refused as written.
    assert!(out.ok(), "{out}");
    assert!(out.stdout.contains("Domain 'quorum-demo' defined"), "{out}");
}

#[test]
fn define_always_validates_and_reports_libvirts_refusal() {
    require("virsh");
    // A plain `virsh define` drops an element it does not know, silently;
    // with --validate the schema refuses it.
    let xml = std::fs::read_to_string(testdata("proposal.xml"))
        .unwrap()
        .replace("<vcpu>1</vcpu>", "<vcpu>1</vcpu>\n  <unknown-to-libvirt/>");

    let out = quorum_stdin(&["define", "-", "--connect", TEST_URI], &xml);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("Failed to define domain"), "{out}");
    assert!(
        out.stderr
            .contains("quorum: virsh define --validate refused the converted domain"),
        "{out}"
    );
}

#[test]
fn define_reports_a_bad_quorum_disk_at_its_place_without_calling_virsh() {
    let xml = std::fs::read_to_string(testdata("proposal.xml"))
        .unwrap()
        .replace("<threshold value='1'/>", "<threshold value='0'/>");

    let out = quorum_stdin(&["define", "-", "--connect", TEST_URI], &xml);

    assert_eq!(out.code, Some(1), "{out}");
    assert_eq!(
        out.stderr,
        "<stdin>:46:18: unsupported configuration: quorum threshold must be at least 1\n"
    );
}
