//! The `validate`, `dumpxml` and `qemu-args` subcommands, run as a user would.
//!
//! Golden files live in `crates/quorum-config/testdata/*.golden`; `@TESTDATA@`
//! stands for the absolute path of that folder.

use std::path::PathBuf;

use assert_cmd::Command;

fn testdata() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../quorum-config/testdata");
    std::fs::canonicalize(d).unwrap()
}

/// `quorum ARGS...` run inside the testdata folder, so error labels are bare file names.
fn quorum(args: &[&str]) -> assert_cmd::assert::Assert {
    Command::new(env!("CARGO_BIN_EXE_quorum"))
        .current_dir(testdata())
        .args(args)
        .assert()
}

fn stdout(a: &assert_cmd::assert::Assert) -> String {
    String::from_utf8(a.get_output().stdout.clone()).unwrap()
}

fn stderr(a: &assert_cmd::assert::Assert) -> String {
    String::from_utf8(a.get_output().stderr.clone()).unwrap()
}

fn golden(name: &str) -> String {
    std::fs::read_to_string(testdata().join(name))
        .unwrap()
        .replace("@TESTDATA@", testdata().to_str().unwrap())
}

fn write_temp(xml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.xml");
    std::fs::write(&path, xml).unwrap();
    (dir, path)
}

// ---- validate ----

#[test]
fn validate_accepts_the_corrected_seed_with_a_summary() {
    let a = quorum(&["validate", "seed-corrected.xml"]).success();

    assert_eq!(stdout(&a), "vda: quorum of 3 replicas, threshold 2\n");
}

#[test]
fn validate_refuses_the_seed_as_written_at_its_first_fault() {
    let a = quorum(&["validate", "seed-as-written.xml"]).code(1);

    assert_eq!(
        stderr(&a),
        "seed-as-written.xml:4:14: XML error: attribute value must be quoted (value=2)\n"
    );
}

#[test]
fn validate_prints_nothing_on_stdout_when_refusing() {
    let a = quorum(&["validate", "seed-as-written.xml"]).code(1);

    assert_eq!(stdout(&a), "");
}

#[test]
fn validate_reports_every_semantic_error() {
    let (_dir, path) = write_temp(
        "<disk type='quorum' device='cdrom'>\n  <threshold value='0'/>\n  <backingStore type='file'><source file='a'/></backingStore>\n  <target dev='xyz'/>\n</disk>\n",
    );

    let a = Command::new(env!("CARGO_BIN_EXE_quorum"))
        .current_dir(path.parent().unwrap())
        .args(["validate", "disk.xml"])
        .assert()
        .code(1);

    assert_eq!(
        stderr(&a),
        "disk.xml:1:21: unsupported configuration: disk device 'cdrom' is not supported for a quorum disk\n\
         disk.xml:2:14: unsupported configuration: quorum threshold must be at least 1\n\
         disk.xml:3:3: XML error: missing disk backing store format\n\
         disk.xml:4:11: XML error: invalid target dev 'xyz': expected a name like 'vda' (fd, hd, sd, vd, xvd or ubd, then letters, digits or '_')\n"
    );
}

#[test]
fn validate_picks_a_domain_disk_by_target() {
    let a = quorum(&["validate", "golden-domain.xml", "--target", "vdc"]).success();

    assert_eq!(stdout(&a), "vdc: quorum of 2 replicas, threshold 2\n");
}

#[test]
fn validate_defaults_to_the_first_quorum_disk_of_a_domain() {
    let a = quorum(&["validate", "golden-domain.xml"]).success();

    assert_eq!(stdout(&a), "vdb: quorum of 4 replicas, threshold 2\n");
}

#[test]
fn validate_refuses_an_unknown_target() {
    let a = quorum(&["validate", "golden-domain.xml", "--target", "vdz"]).code(1);

    assert_eq!(
        stderr(&a),
        "golden-domain.xml:3:1: invalid argument: no disk with target dev 'vdz' in the domain\n"
    );
}

#[test]
fn validate_of_a_missing_file_exits_1() {
    let a = quorum(&["validate", "no-such.xml"]).code(1);

    assert_eq!(
        stderr(&a),
        "no-such.xml: cannot read file: No such file or directory (os error 2)\n"
    );
}

#[test]
fn validate_does_not_need_the_images_to_exist() {
    quorum(&["validate", "golden-domain.xml", "--target", "vdb"]).success();
}

// ---- dumpxml ----

#[test]
fn dumpxml_of_the_seed_matches_its_golden_file() {
    let a = quorum(&["dumpxml", "seed-corrected.xml"]).success();

    assert_eq!(stdout(&a), golden("dumpxml-seed.golden"));
}

#[test]
fn dumpxml_of_domain_disk_vdb_matches_its_golden_file() {
    let a = quorum(&["dumpxml", "golden-domain.xml", "--target", "vdb"]).success();

    assert_eq!(stdout(&a), golden("dumpxml-vdb.golden"));
}

#[test]
fn dumpxml_of_domain_disk_vdc_matches_its_golden_file() {
    let a = quorum(&["dumpxml", "golden-domain.xml", "--target", "vdc"]).success();

    assert_eq!(stdout(&a), golden("dumpxml-vdc.golden"));
}

#[test]
fn dumpxml_of_its_own_output_gives_identical_bytes() {
    let first = stdout(&quorum(&["dumpxml", "golden-domain.xml"]).success());
    let (_dir, path) = write_temp(&first);

    let second = stdout(&quorum(&["dumpxml", path.to_str().unwrap()]).success());

    assert_eq!(first, second);
}

#[test]
fn dumpxml_of_an_invalid_document_exits_1_with_the_errors() {
    let a = quorum(&["dumpxml", "seed-as-written.xml"]).code(1);

    assert_eq!(
        (stdout(&a), stderr(&a)),
        (
            String::new(),
            "seed-as-written.xml:4:14: XML error: attribute value must be quoted (value=2)\n"
                .into()
        )
    );
}

// ---- qemu-args ----

#[test]
fn qemu_args_of_the_seed_matches_its_golden_file() {
    let a = quorum(&["qemu-args", "seed-corrected.xml"]).success();

    assert_eq!(stdout(&a), golden("qemu-args-seed.golden"));
}

#[test]
fn qemu_args_of_domain_disk_vdb_matches_its_golden_file() {
    let a = quorum(&["qemu-args", "golden-domain.xml", "--target", "vdb"]).success();

    assert_eq!(stdout(&a), golden("qemu-args-vdb.golden"));
}

#[test]
fn qemu_args_of_domain_disk_vdc_matches_its_golden_file() {
    let a = quorum(&["qemu-args", "golden-domain.xml", "--target", "vdc"]).success();

    assert_eq!(stdout(&a), golden("qemu-args-vdc.golden"));
}

#[test]
fn qemu_args_json_of_domain_disk_vdb_matches_its_golden_file() {
    let a = quorum(&[
        "qemu-args",
        "--json",
        "golden-domain.xml",
        "--target",
        "vdb",
    ])
    .success();

    assert_eq!(stdout(&a), golden("qemu-args-json-vdb.golden"));
}

#[test]
fn qemu_args_json_of_domain_disk_vdc_matches_its_golden_file() {
    let a = quorum(&[
        "qemu-args",
        "--json",
        "golden-domain.xml",
        "--target",
        "vdc",
    ])
    .success();

    assert_eq!(stdout(&a), golden("qemu-args-json-vdc.golden"));
}

#[test]
fn qemu_args_lines_each_start_with_blockdev() {
    let a = quorum(&["qemu-args", "seed-corrected.xml"]).success();

    assert!(stdout(&a).lines().all(|l| l.starts_with("-blockdev '{")));
}

#[test]
fn qemu_args_quotes_paths_with_single_quotes_for_the_shell() {
    let (_dir, path) = write_temp(
        "<disk type='quorum'><threshold value='1'/><backingStore type='file'><format type='raw'/><source file='/i/it&apos;s.raw'/></backingStore><target dev='vda'/></disk>",
    );

    let a = quorum(&["qemu-args", path.to_str().unwrap()]).success();

    assert_eq!(
        stdout(&a).lines().next().unwrap(),
        r#"-blockdev '{"driver":"file","filename":"/i/it'\''s.raw","node-name":"quorum-vda-1-storage"}'"#
    );
}
