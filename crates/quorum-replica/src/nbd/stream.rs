//! The socket under one connection: TCP or unix, shared by the writer
//! and (as a clone) the reader thread, with timeouts on both sides.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bytes::BytesMut;

use super::NbdAddress;

/// Bytes the reader asks the socket for at once (at least).
pub(super) const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug)]
pub(super) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(super) fn connect(addr: &NbdAddress, timeout: Duration) -> io::Result<Stream> {
        match addr {
            NbdAddress::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path)?)),
            NbdAddress::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address found");
                for a in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    pub(super) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Socket options are shared by every clone of the socket.
    pub(super) fn set_timeouts(&self, read: Duration, write: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
            Stream::Unix(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
        }
    }

    pub(super) fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub(super) fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => (&*s).write_all(buf),
            Stream::Unix(s) => (&*s).write_all(buf),
        }
    }

    pub(super) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    /// Append at least one byte (or report EOF as 0) without zeroing the
    /// buffer first.
    pub(super) fn read_into(&self, buf: &mut BytesMut) -> io::Result<usize> {
        buf.reserve(READ_CHUNK);
        let spare = buf.spare_capacity_mut();
        loop {
            // SAFETY: read(2) writes at most `spare.len()` bytes into memory
            // we own exclusively; it never reads it.
            let n = unsafe { libc::read(self.fd(), spare.as_mut_ptr().cast(), spare.len()) };
            if n >= 0 {
                let n = n as usize;
                // SAFETY: the kernel initialised these `n` bytes.
                unsafe { buf.set_len(buf.len() + n) };
                return Ok(n);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
