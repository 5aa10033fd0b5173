//! Which layers are the same file, for the rule that one file is one replica.
//!
//! Paths are compared lexically (`.` and `..` resolved, repeated `/`
//! dropped) by [`crate::parse_str`], which touches no file system. [`crate::load`]
//! also asks the file system: a path that exists is known by its device and
//! inode (a block device by the device it opens), so a symlink, a hard link or a
//! `..` through a symlinked folder is caught too; a path that does not exist
//! yet is known by its nearest existing folder's real path plus the rest,
//! resolved lexically.

use std::path::{Component, Path, PathBuf};

use crate::model::{NbdHost, Source};

/// How a layer is known for the duplicate rule; equal identities are one file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Identity {
    /// The same path, once written out in full.
    Path(String),
    /// A file that exists: device and inode.
    Inode { dev: u64, ino: u64 },
    /// A block device node: the device it opens (`st_rdev`).
    BlockDevice { rdev: u64 },
}

impl Identity {
    /// Why two layers with this identity are one file, for the error message.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Identity::Path(_) => "the same path once '.' and '..' are resolved",
            Identity::Inode { .. } => "the same device and inode",
            Identity::BlockDevice { .. } => "the same block device",
        }
    }
}

/// `path` with `.` and `..` resolved and repeated separators dropped, without
/// touching the file system (`..` at the root stays at the root).
pub(crate) fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(c),
            },
            // A root after a prefix, or a normal name: keep it.
            _ => out.push(c),
        }
    }
    out
}

/// The identity of a layer's source; `use_fs` also asks the file system.
pub(crate) fn identify(source: &Source, use_fs: bool) -> Identity {
    match source {
        Source::File { path } => local(path, use_fs),
        Source::Block { dev } => local(dev, use_fs),
        Source::Nbd { export, host, .. } => {
            let name = export.as_deref().unwrap_or("");
            Identity::Path(match host {
                NbdHost::Tcp { name: h, port } => format!("nbd://{h}:{port}/{name}"),
                NbdHost::Unix { socket } => {
                    let socket = if use_fs {
                        resolve_missing(socket)
                    } else {
                        lexical(socket)
                    };
                    format!("nbd+unix:///{name}?socket={}", socket.display())
                }
            })
        }
    }
}

fn local(path: &Path, use_fs: bool) -> Identity {
    if !use_fs {
        return Identity::Path(lexical(path).display().to_string());
    }
    match std::fs::metadata(path) {
        Ok(m) => file_identity(&m),
        Err(_) => Identity::Path(resolve_missing(path).display().to_string()),
    }
}

#[cfg(unix)]
fn file_identity(m: &std::fs::Metadata) -> Identity {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if m.file_type().is_block_device() {
        Identity::BlockDevice { rdev: m.rdev() }
    } else {
        Identity::Inode {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// The real path of the nearest folder of `path` that exists, followed by the
/// rest of `path` resolved lexically.
fn resolve_missing(path: &Path) -> PathBuf {
    let path = lexical(path);
    let mut existing = path.as_path();
    loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            let rest = path.strip_prefix(existing).unwrap_or(Path::new(""));
            return lexical(&real.join(rest));
        }
        match existing.parent() {
            Some(p) => existing = p,
            None => return path,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lexical;
    use std::path::Path;

    #[test]
    fn lexical_resolves_dots_and_repeated_separators() {
        for (given, want) in [
            ("/a/./b//c", "/a/b/c"),
            ("/a/x/../b", "/a/b"),
            ("/a/b/..", "/a"),
            ("/../a", "/a"),
            ("/a/../../b", "/b"),
            ("../../a", "../../a"),
            ("x/../../a", "../a"),
        ] {
            assert_eq!(lexical(Path::new(given)), Path::new(want), "{given}");
        }
    }
}
