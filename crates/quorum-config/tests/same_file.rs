//! One file reached through several paths is one replica, and is refused as
//! a path written twice is: lexically in `parse_str`, by device and inode (or
//! block device) in `load`.

use std::os::unix::fs::symlink;
use std::path::Path;

use quorum_config::{load, parse_str};

/// A disk whose replicas are raw files at `paths` (as written in the XML).
fn xml(paths: &[&str]) -> String {
    let mut s = String::from("<disk type='quorum'>\n  <threshold value='1'/>\n");
    for p in paths {
        s.push_str(&format!(
            "  <backingStore type='file'><format type='raw'/><source file='{p}'/></backingStore>\n"
        ));
    }
    s.push_str("  <target dev='vda'/>\n</disk>\n");
    s
}

/// Write `xml(paths)` as `dir/disk.xml` and load it; the error lines, if any.
fn load_errors(dir: &Path, paths: &[&str]) -> Vec<String> {
    let file = dir.join("disk.xml");
    std::fs::write(&file, xml(paths)).unwrap();
    match load(&file, None) {
        Ok(_) => Vec::new(),
        Err(e) => e.errors().iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn parse_str_refuses_one_path_spelled_two_ways() {
    let e = parse_str(
        &xml(&["r0.raw", "./sub/../r0.raw", "r1.raw"]),
        "disk.xml",
        Path::new("/base"),
        None,
    )
    .unwrap_err();

    assert_eq!(
        e.to_string(),
        "disk.xml:4:49: unsupported configuration: replica path '/base/./sub/../r0.raw' is the \
         same file as '/base/r0.raw' (the same path once '.' and '..' are resolved; first at \
         line 3, column 49): one file can only be one replica"
    );
}

#[test]
fn load_refuses_a_symlink_to_another_replica() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("r0.raw"), vec![0; 4096]).unwrap();
    std::fs::write(d.join("r1.raw"), vec![0; 4096]).unwrap();
    symlink(d.join("r0.raw"), d.join("link.raw")).unwrap();

    let errors = load_errors(d, &["r0.raw", "r1.raw", "link.raw"]);

    let label = d.join("disk.xml");
    assert_eq!(
        errors,
        [format!(
            "{}:5:49: unsupported configuration: replica path '{}' is the same file as '{}' \
             (the same device and inode; first at line 3, column 49): one file can only be one \
             replica",
            label.display(),
            d.join("link.raw").display(),
            d.join("r0.raw").display()
        )]
    );
}

#[test]
fn load_refuses_a_hard_link_and_dotdot_through_a_symlinked_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("real/deep")).unwrap();
    std::fs::write(d.join("real/r0.raw"), vec![0; 4096]).unwrap();
    std::fs::write(d.join("r0.raw"), vec![0; 4096]).unwrap();
    std::fs::hard_link(d.join("real/r0.raw"), d.join("hard.raw")).unwrap();
    // via/.. is real/, not d/: only the file system knows. So via/../r0.raw
    // is real/r0.raw, and d/r0.raw (lexically equal to it) is another file.
    symlink(d.join("real/deep"), d.join("via")).unwrap();

    let errors = load_errors(d, &["r0.raw", "real/r0.raw", "hard.raw", "via/../r0.raw"]);

    assert_eq!(errors.len(), 2, "{errors:#?}");
    let real = format!("is the same file as '{}'", d.join("real/r0.raw").display());
    assert!(errors.iter().all(|e| e.contains(&real)), "{errors:#?}");
    assert!(
        errors[0].contains("replica path '") && errors[0].contains("hard.raw' is the same file as"),
        "{errors:#?}"
    );
    assert!(
        errors[1].contains("via/../r0.raw' is the same file as"),
        "{errors:#?}"
    );
}

#[test]
fn load_refuses_a_missing_file_named_through_a_symlinked_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("images")).unwrap();
    symlink(d.join("images"), d.join("alias")).unwrap();

    // Neither file exists yet (quorum create would make one and keep the other).
    let errors = load_errors(d, &["images/new.raw", "alias/new.raw"]);

    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("alias/new.raw' is the same file as '")
            && errors[0].contains("images/new.raw' (the same path once"),
        "{errors:#?}"
    );
}
