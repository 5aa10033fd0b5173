//! Protocol numbers from the NBD protocol document (`doc/proto.md`).
//!
//! Every multi-byte field is big-endian on the wire.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, sent by the server in the greeting and by the
/// client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle negotiation magic (follows `NBDMAGIC` in the oldstyle greeting).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (16 bits, server to client).
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits, client to server).
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client wants no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (16 bits, per export).
pub mod transmission_flags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export behaves like a rotational disk.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported on reads.
    pub const SEND_DF: u16 = 1 << 7;
    /// Flush and FUA on one connection cover writes acknowledged on all.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is understood.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option codes (client to server, during haggling).
pub mod opt {
    /// Select an export and enter transmission (no error reporting).
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS (not supported here).
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Extended headers (not supported here).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (server to client, during haggling).
pub mod rep {
    /// Success / end of a list.
    pub const ACK: u32 = 1;
    /// One export of an `NBD_OPT_LIST` answer.
    pub const SERVER: u32 = 2;
    /// One information item of an `NBD_OPT_INFO`/`NBD_OPT_GO` answer.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set on every error reply.
    pub const ERR_BIT: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    /// TLS required.
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    /// Block size negotiation required.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    /// Request or reply too large.
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
}

/// Information types of `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags (mandatory).
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types (transmission requests).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows the header).
    pub const WRITE: u16 = 1;
    /// Disconnect (no reply).
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim / discard.
    pub const TRIM: u16 = 4;
    /// Cache (prefetch hint).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status query.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (16 bits per request).
pub mod cmd_flags {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// `WRITE_ZEROES`: do not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `READ`: do not fragment the reply.
    pub const DF: u16 = 1 << 2;
    /// `BLOCK_STATUS`: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `WRITE_ZEROES`: fail fast with `ENOTSUP` unless zeroing is fast.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk flags.
pub mod reply_flags {
    /// Last chunk of the reply.
    pub const DONE: u16 = 1 << 0;
}

/// Structured reply chunk types.
pub mod reply_type {
    /// Empty final chunk.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A zero range at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status extents for one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// Bit set on every error chunk type.
    pub const ERR_BIT: u16 = 1 << 15;
    /// Error for the whole request.
    pub const ERROR: u16 = ERR_BIT | 1;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = ERR_BIT | 2;
}

/// NBD error values (not host errno; these are the portable protocol values).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on device.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` status flags.
pub mod state {
    /// The extent is not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// The extent reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// Name of the one metadata context this crate knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Minimum block size advertised by servers built on this crate.
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Preferred block size advertised by servers built on this crate.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Largest request payload (read or write) this crate accepts: 32 MiB.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest option data the server accepts during haggling.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Longest string (export name, description, message) on the wire.
pub const MAX_STRING: usize = 4096;
/// Length of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
