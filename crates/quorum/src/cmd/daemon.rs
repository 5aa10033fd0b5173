//! `quorum serve --daemonize`, `--socket-mode`, `--socket-owner` and
//! systemd's readiness protocol: what happens around the moment serve listens.
//!
//! ```text
//!  parent ──fork──▶ child (setsid) ── open replicas, bind, pid file ──▶ ready()
//!    │                                                              │
//!    └── waits on a pipe ◀───────────── 'R' ────────────────────────┘
//!        exit 0 on 'R'; otherwise the child's exit status (its error
//!        went to the parent's stderr, which the child keeps until ready)
//! ```

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::{Context, anyhow, bail};

/// The write end of the pipe to a waiting parent (child of `--daemonize` only).
static PARENT: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// With `daemonize`, fork. The parent waits until the child is ready (or
/// gone) and gets `Some(exit code)`: it must return it at once. The child
/// (and a run without `daemonize`) gets `None` and goes on serving.
///
/// Must run while the process has one thread: before any runtime or
/// replica is opened.
pub fn daemonize_if(daemonize: bool) -> anyhow::Result<Option<ExitCode>> {
    if !daemonize {
        return Ok(None);
    }
    let (read, write) = nix::unistd::pipe().context("cannot create a pipe")?;
    // SAFETY: the process is single-threaded here (see above), so the child
    // may run any code after fork.
    match unsafe { nix::unistd::fork() }.context("cannot fork")? {
        nix::unistd::ForkResult::Parent { child } => {
            drop(write);
            let mut file = std::fs::File::from(read);
            let mut byte = [0u8; 1];
            let ready = matches!(file.read(&mut byte), Ok(1) if byte[0] == b'R');
            if ready {
                return Ok(Some(ExitCode::SUCCESS));
            }
            // The child failed (and said why on our stderr) or died.
            let code = match nix::sys::wait::waitpid(child, None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, c)) if c != 0 => c as u8,
                _ => crate::exit::ERROR,
            };
            Ok(Some(ExitCode::from(code)))
        }
        nix::unistd::ForkResult::Child => {
            drop(read);
            nix::unistd::setsid().context("setsid")?;
            *PARENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(write);
            Ok(None)
        }
    }
}

/// `--socket-owner`: `USER[:GROUP]`, or `+UID[:+GID]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// The user.
    pub uid: u32,
    /// The group, when given.
    pub gid: Option<u32>,
}

/// clap parser for `--socket-owner`.
pub fn parse_owner(s: &str) -> Result<Owner, String> {
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid = match u.strip_prefix('+') {
        Some(n) => n.parse().ok(),
        None => lookup_user(u),
    }
    .ok_or_else(|| format!("unknown user '{u}' (give a name or +UID)"))?;
    let gid = match g {
        None => None,
        Some(g) => Some(
            match g.strip_prefix('+') {
                Some(n) => n.parse().ok(),
                None => lookup_group(g),
            }
            .ok_or_else(|| format!("unknown group '{g}' (give a name or +GID)"))?,
        ),
    };
    Ok(Owner { uid, gid })
}

/// clap parser for `--socket-mode`: octal permission bits such as `0660`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "'{s}' is not a socket mode: give octal permission bits, e.g. 0660"
        )),
    }
}

/// The uid of user `name` (getpwnam_r: safe beside other threads).
pub(crate) fn lookup_user(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live memory of the stated size.
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(pw.pw_uid)
}

/// The gid of group `name` (getgrnam_r: safe beside other threads).
pub(crate) fn lookup_group(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: an all-zero group is a valid value to be overwritten.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer refers to live memory of the stated size.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut gr,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(gr.gr_gid)
}

/// Serve listens (and wrote its pid file): apply the socket's owner and
/// mode, then tell whoever waits — the `--daemonize` parent, and systemd
/// when `NOTIFY_SOCKET` is set (`Type=notify`).
pub fn ready(socket: Option<&Path>, mode: Option<u32>, owner: Option<Owner>) -> anyhow::Result<()> {
    if let Some(path) = socket {
        if let Some(o) = owner {
            std::os::unix::fs::chown(path, Some(o.uid), o.gid)
                .with_context(|| format!("cannot change the owner of {}", path.display()))?;
        }
        if let Some(m) = mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(m))
                .with_context(|| format!("cannot change the mode of {}", path.display()))?;
        }
    } else if mode.is_some() || owner.is_some() {
        bail!("--socket-mode and --socket-owner go with --socket");
    }
    sd_notify("READY=1")?;
    let parent = PARENT.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(fd) = parent {
        detach_stdio()?;
        nix::unistd::write(&fd, b"R").context("cannot tell the parent")?;
    }
    Ok(())
}

/// A daemon holds no terminal or pipe of its caller's: stdin and stdout go
/// to /dev/null, and so does stderr unless it is a regular file (a log the
/// caller redirected it to, `2>>serve.log`).
fn detach_stdio() -> anyhow::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("cannot open /dev/null")?;
    let stderr_is_file = nix::sys::stat::fstat(std::io::stderr())
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
        .unwrap_or(false);
    let mut fds = vec![0, 1];
    if !stderr_is_file {
        fds.push(2);
    }
    for fd in fds {
        // SAFETY: dup2 onto the standard descriptors, which stay open.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(anyhow!(std::io::Error::last_os_error()).context("dup2"));
        }
    }
    Ok(())
}

/// Send `state` to systemd's `NOTIFY_SOCKET`, if set (`@` = abstract name).
fn sd_notify(state: &str) -> anyhow::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    let sock = std::os::unix::net::UnixDatagram::unbound().context("notify socket")?;
    let bytes = path.as_encoded_bytes();
    let addr = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
    } else {
        std::os::unix::net::SocketAddr::from_pathname(Path::new(&path))
    }
    .context("NOTIFY_SOCKET is not a socket address")?;
    let msg = format!("{state}\nMAINPID={}\n", std::process::id());
    sock.send_to_addr(msg.as_bytes(), &addr)
        .context("cannot notify systemd (NOTIFY_SOCKET)")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_take_names_and_numbers() {
        assert_eq!(
            parse_owner("+1000:+100"),
            Ok(Owner {
                uid: 1000,
                gid: Some(100)
            })
        );
        assert_eq!(parse_owner("root"), Ok(Owner { uid: 0, gid: None }));
        assert_eq!(
            parse_owner("root:root"),
            Ok(Owner {
                uid: 0,
                gid: Some(0)
            })
        );
        assert!(
            parse_owner("no-such-user-q")
                .unwrap_err()
                .contains("unknown user")
        );
        assert!(
            parse_owner("+1:no-such-group-q")
                .unwrap_err()
                .contains("unknown group")
        );
    }

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("10000").is_err());
    }
}
