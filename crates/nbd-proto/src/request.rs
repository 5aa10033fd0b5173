//! Transmission requests: the 28-byte header, the write payload, a
//! decoder that never allocates more than the advertised maximum, and the
//! semantic checks a server applies before executing a request.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::consts::{REQUEST_HEADER_LEN, REQUEST_MAGIC, cmd, cmd_flags, errno, transmission_flags};
use crate::error::ProtocolError;

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`; the payload follows the header.
    Write,
    /// `NBD_CMD_DISC`; no reply.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Any other code; servers answer `NBD_EINVAL`.
    Unknown(u16),
}

impl Command {
    /// The command for a wire code.
    pub fn from_u16(v: u16) -> Self {
        match v {
            cmd::READ => Self::Read,
            cmd::WRITE => Self::Write,
            cmd::DISC => Self::Disc,
            cmd::FLUSH => Self::Flush,
            cmd::TRIM => Self::Trim,
            cmd::CACHE => Self::Cache,
            cmd::WRITE_ZEROES => Self::WriteZeroes,
            cmd::BLOCK_STATUS => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    /// The wire code.
    pub fn to_u16(self) -> u16 {
        match self {
            Self::Read => cmd::READ,
            Self::Write => cmd::WRITE,
            Self::Disc => cmd::DISC,
            Self::Flush => cmd::FLUSH,
            Self::Trim => cmd::TRIM,
            Self::Cache => cmd::CACHE,
            Self::WriteZeroes => cmd::WRITE_ZEROES,
            Self::BlockStatus => cmd::BLOCK_STATUS,
            Self::Unknown(v) => v,
        }
    }

    /// True for commands that change the export's contents.
    pub fn is_write(self) -> bool {
        matches!(self, Self::Write | Self::Trim | Self::WriteZeroes)
    }
}

/// The fixed 28-byte request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestHeader {
    /// Command flags (`consts::cmd_flags`).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (the payload length for writes).
    pub length: u32,
}

impl RequestHeader {
    /// Append the 28 header bytes to `out`.
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.command.to_u16());
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }

    /// Parse a header from exactly [`REQUEST_HEADER_LEN`] bytes.
    pub fn decode(mut b: &[u8]) -> Result<Self, ProtocolError> {
        debug_assert!(b.len() >= REQUEST_HEADER_LEN);
        let magic = b.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(ProtocolError::BadMagic {
                context: "request",
                found: magic.into(),
                expected: REQUEST_MAGIC.into(),
            });
        }
        let flags = b.get_u16();
        let command = Command::from_u16(b.get_u16());
        Ok(Self {
            flags,
            command,
            cookie: b.get_u64(),
            offset: b.get_u64(),
            length: b.get_u32(),
        })
    }

    /// True if `flag` (from `consts::cmd_flags`) is set.
    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// A complete request: header plus the write payload (empty for other commands).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The header.
    pub header: RequestHeader,
    /// The `NBD_CMD_WRITE` payload, `header.length` bytes; empty otherwise.
    pub payload: Bytes,
}

impl Request {
    /// Append header and payload to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        self.header.encode(out);
        out.extend_from_slice(&self.payload);
    }
}

/// What the decoder produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A complete request.
    Request(Request),
    /// A write whose payload exceeds the maximum. The decoder discards the
    /// payload as it arrives (never buffering it); the server should reply
    /// `NBD_EINVAL` and carry on with the next request.
    Oversized(RequestHeader),
}

/// Incremental request decoder (server side).
///
/// Feed it the receive buffer; it consumes whole requests only, so a
/// partial frame stays in the buffer until more bytes arrive.
#[derive(Debug, Clone)]
pub struct RequestDecoder {
    max_payload: u32,
    discard: u64,
}

impl RequestDecoder {
    /// A decoder accepting write payloads up to `max_payload` bytes.
    pub fn new(max_payload: u32) -> Self {
        Self {
            max_payload,
            discard: 0,
        }
    }

    /// Bytes of an oversized payload still to be thrown away.
    pub fn discarding(&self) -> u64 {
        self.discard
    }

    /// How many bytes `buf` must hold before the next `decode` can make
    /// progress; lets a driver reserve the whole write payload at once.
    pub fn bytes_wanted(&self, buf: &[u8]) -> usize {
        if self.discard > 0 {
            return 1;
        }
        if buf.len() < REQUEST_HEADER_LEN {
            return REQUEST_HEADER_LEN;
        }
        let command = u16::from_be_bytes([buf[6], buf[7]]);
        let length = u32::from_be_bytes([buf[24], buf[25], buf[26], buf[27]]);
        if command == cmd::WRITE && length <= self.max_payload {
            REQUEST_HEADER_LEN + length as usize
        } else {
            REQUEST_HEADER_LEN
        }
    }

    /// Decode the next request from `buf`, consuming exactly its bytes.
    /// `Ok(None)` means more input is needed. An error (bad magic) means the
    /// stream cannot be resynchronised: disconnect.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, ProtocolError> {
        if self.discard > 0 {
            let n = self.discard.min(buf.len() as u64);
            buf.advance(n as usize);
            self.discard -= n;
            if self.discard > 0 {
                return Ok(None);
            }
        }
        if buf.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let header = RequestHeader::decode(&buf[..REQUEST_HEADER_LEN])?;
        if header.command != Command::Write {
            buf.advance(REQUEST_HEADER_LEN);
            return Ok(Some(Incoming::Request(Request {
                header,
                payload: Bytes::new(),
            })));
        }
        if header.length > self.max_payload {
            buf.advance(REQUEST_HEADER_LEN);
            self.discard = header.length.into();
            return Ok(Some(Incoming::Oversized(header)));
        }
        let total = REQUEST_HEADER_LEN + header.length as usize;
        if buf.len() < total {
            return Ok(None);
        }
        buf.advance(REQUEST_HEADER_LEN);
        let payload = buf.split_to(header.length as usize).freeze();
        Ok(Some(Incoming::Request(Request { header, payload })))
    }
}

/// What the server negotiated for one connection: the facts request checks need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags advertised (`consts::transmission_flags`).
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The id of `base:allocation` if it was selected.
    pub base_allocation: Option<u32>,
    /// Largest read/write payload accepted.
    pub max_payload: u32,
}

/// Check a request against the negotiated state before executing it.
/// Returns the NBD error to reply with (`consts::errno`) if it must be refused.
///
/// Rules: writes (write, trim, zero) to a read-only export give `EPERM`;
/// unknown commands, flags not valid for the command and commands not
/// advertised give `EINVAL`; ranges past the end
/// (or overflowing) give `EINVAL`; a read longer than the maximum payload
/// gives `EOVERFLOW`; `BLOCK_STATUS` without a selected context, or with
/// length 0, gives `EINVAL`. `DISC` is always accepted.
pub fn check_request(h: &RequestHeader, info: &TransmissionInfo) -> Result<(), u32> {
    use transmission_flags as tf;
    let fua = if info.flags & tf::SEND_FUA != 0 {
        cmd_flags::FUA
    } else {
        0
    };
    let allowed = match h.command {
        Command::Read | Command::Cache | Command::Flush => fua,
        Command::Write | Command::Trim => fua,
        Command::WriteZeroes => {
            let fast = if info.flags & tf::SEND_FAST_ZERO != 0 {
                cmd_flags::FAST_ZERO
            } else {
                0
            };
            fua | cmd_flags::NO_HOLE | fast
        }
        Command::BlockStatus => fua | cmd_flags::REQ_ONE,
        Command::Disc => return Ok(()),
        Command::Unknown(_) => return Err(errno::EINVAL),
    };
    if h.command.is_write() && info.flags & tf::READ_ONLY != 0 {
        return Err(errno::EPERM);
    }
    if h.flags & !allowed != 0 {
        return Err(errno::EINVAL);
    }
    let supported = match h.command {
        Command::Flush => info.flags & tf::SEND_FLUSH != 0,
        Command::Trim => info.flags & tf::SEND_TRIM != 0,
        Command::WriteZeroes => info.flags & tf::SEND_WRITE_ZEROES != 0,
        Command::BlockStatus => info.structured && info.base_allocation.is_some(),
        _ => true,
    };
    if !supported {
        return Err(errno::EINVAL);
    }
    if h.command == Command::Flush {
        return Ok(());
    }
    let end = h.offset.checked_add(h.length.into());
    if end.is_none_or(|end| end > info.size) {
        return Err(errno::EINVAL);
    }
    if h.command == Command::Read && h.length > info.max_payload {
        return Err(errno::EOVERFLOW);
    }
    if h.command == Command::Write && h.length > info.max_payload {
        return Err(errno::EINVAL);
    }
    if h.command == Command::BlockStatus && h.length == 0 {
        return Err(errno::EINVAL);
    }
    Ok(())
}
