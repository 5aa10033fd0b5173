//! Transmission replies: encoders for simple replies and structured chunks
//! (server side), and a decoder for them (client side).
//!
//! Encoders write headers only where a payload follows (`put_simple_reply`
//! before read data, `put_offset_data_header` before an `OFFSET_DATA`
//! payload), so a driver can send the header and the data buffer with one
//! vectored write and never copy the data.

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::consts::{
    CHUNK_HEADER_LEN, MAX_PAYLOAD, MAX_STRING, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC, reply_flags, reply_type, state,
};
use crate::error::ProtocolError;
use crate::request::Command;

/// One `base:allocation` style extent descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockExtent {
    /// Length in bytes (never 0).
    pub length: u32,
    /// Status flags (`consts::state`).
    pub flags: u32,
}

fn done_flag(done: bool) -> u16 {
    if done { reply_flags::DONE } else { 0 }
}

fn clip_message(message: &str) -> &str {
    if message.len() <= MAX_STRING {
        return message;
    }
    let mut end = MAX_STRING;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Simple reply header (16 bytes). For a successful read the caller sends
/// the data right after it.
pub fn put_simple_reply(out: &mut impl BufMut, cookie: u64, error: u32) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// Structured chunk header (20 bytes) announcing `length` payload bytes.
pub fn put_chunk_header(out: &mut impl BufMut, flags: u16, kind: u16, cookie: u64, length: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(length);
}

/// `OFFSET_DATA` chunk header plus its offset field (28 bytes); the caller
/// sends `data_len` bytes of data right after.
pub fn put_offset_data_header(
    out: &mut impl BufMut,
    cookie: u64,
    done: bool,
    offset: u64,
    data_len: u32,
) {
    put_chunk_header(
        out,
        done_flag(done),
        reply_type::OFFSET_DATA,
        cookie,
        data_len + 8,
    );
    out.put_u64(offset);
}

/// Complete `OFFSET_HOLE` chunk (32 bytes).
pub fn put_offset_hole(out: &mut impl BufMut, cookie: u64, done: bool, offset: u64, len: u32) {
    put_chunk_header(out, done_flag(done), reply_type::OFFSET_HOLE, cookie, 12);
    out.put_u64(offset);
    out.put_u32(len);
}

/// Complete `BLOCK_STATUS` chunk for one metadata context.
pub fn put_block_status(
    out: &mut impl BufMut,
    cookie: u64,
    done: bool,
    context_id: u32,
    extents: &[BlockExtent],
) {
    let len = 4 + 8 * extents.len() as u32;
    put_chunk_header(out, done_flag(done), reply_type::BLOCK_STATUS, cookie, len);
    out.put_u32(context_id);
    for e in extents {
        out.put_u32(e.length);
        out.put_u32(e.flags);
    }
}

/// Complete `ERROR` chunk. The message is clipped to 4096 bytes.
pub fn put_error(out: &mut impl BufMut, cookie: u64, done: bool, error: u32, message: &str) {
    let m = clip_message(message);
    put_chunk_header(
        out,
        done_flag(done),
        reply_type::ERROR,
        cookie,
        6 + m.len() as u32,
    );
    out.put_u32(error);
    out.put_u16(m.len() as u16);
    out.put_slice(m.as_bytes());
}

/// Complete `ERROR_OFFSET` chunk. The message is clipped to 4096 bytes.
pub fn put_error_offset(
    out: &mut impl BufMut,
    cookie: u64,
    done: bool,
    error: u32,
    message: &str,
    offset: u64,
) {
    let m = clip_message(message);
    put_chunk_header(
        out,
        done_flag(done),
        reply_type::ERROR_OFFSET,
        cookie,
        14 + m.len() as u32,
    );
    out.put_u32(error);
    out.put_u16(m.len() as u16);
    out.put_slice(m.as_bytes());
    out.put_u64(offset);
}

/// Complete `NONE` chunk, always final.
pub fn put_none(out: &mut impl BufMut, cookie: u64) {
    put_chunk_header(out, reply_flags::DONE, reply_type::NONE, cookie, 0);
}

/// Turn a backend's extent list (`(length, flags)`, covering the range from
/// the request offset) into a valid `BLOCK_STATUS` descriptor list for a
/// request of `len` bytes:
/// adjacent equal extents merge, zero lengths drop, lengths are split to fit
/// 32 bits, the list stops once it covers `len` (only the last extent may
/// reach beyond), at most 2^20 descriptors, exactly one with `req_one`
/// (clamped to `len`), and never empty (an unknown range reports flags 0).
pub fn build_extents(
    len: u32,
    req_one: bool,
    extents: impl IntoIterator<Item = (u64, u32)>,
) -> Vec<BlockExtent> {
    const MAX_EXTENTS: usize = 1 << 20;
    // Largest 512-aligned length that fits in 32 bits.
    const MAX_LEN: u64 = 0xffff_fe00;
    let mut out: Vec<BlockExtent> = Vec::new();
    let mut covered: u64 = 0;
    for (mut length, flags) in extents {
        while length > 0 && covered < u64::from(len) && out.len() < MAX_EXTENTS {
            if let Some(last) = out.last_mut()
                && last.flags == flags
                && u64::from(last.length) + length <= MAX_LEN
            {
                last.length += length as u32;
                covered += length;
                length = 0;
                continue;
            }
            let piece = length.min(MAX_LEN);
            out.push(BlockExtent {
                length: piece as u32,
                flags,
            });
            covered += piece;
            length -= piece;
        }
    }
    if out.is_empty() {
        out.push(BlockExtent {
            length: len.max(1),
            flags: 0,
        });
    }
    if req_one {
        out.truncate(1);
        out[0].length = out[0].length.min(len.max(1));
    }
    out
}

/// `base:allocation` flags for an extent.
pub fn allocation_flags(hole: bool, zero: bool) -> u32 {
    (if hole { state::HOLE } else { 0 }) | (if zero { state::ZERO } else { 0 })
}

/// A decoded structured chunk body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        /// Absolute export offset of `data`.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Absolute export offset.
        offset: u64,
        /// Length of the zero range.
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    BlockStatus {
        /// The metadata context id.
        context_id: u32,
        /// The descriptors.
        extents: Vec<BlockExtent>,
    },
    /// `NBD_REPLY_TYPE_ERROR`.
    Error {
        /// NBD error value.
        error: u32,
        /// Human-readable message (may be empty).
        message: String,
    },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset {
        /// NBD error value.
        error: u32,
        /// Human-readable message (may be empty).
        message: String,
        /// Offset of the failure.
        offset: u64,
    },
    /// An unknown error chunk type (bit 15 set): the request failed.
    UnknownError {
        /// The chunk type.
        kind: u16,
        /// NBD error value.
        error: u32,
    },
}

/// A decoded reply message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply; `data` holds the payload of a successful read.
    Simple {
        /// The request cookie.
        cookie: u64,
        /// NBD error value, 0 on success.
        error: u32,
        /// Read data (empty for other commands or on error).
        data: Bytes,
    },
    /// One structured chunk.
    Chunk {
        /// The request cookie.
        cookie: u64,
        /// True on the final chunk of the reply.
        done: bool,
        /// The chunk body.
        chunk: Chunk,
    },
}

impl Reply {
    /// The cookie of the request this answers.
    pub fn cookie(&self) -> u64 {
        match self {
            Self::Simple { cookie, .. } | Self::Chunk { cookie, .. } => *cookie,
        }
    }

    /// True if this message completes its request.
    pub fn is_final(&self) -> bool {
        match self {
            Self::Simple { .. } => true,
            Self::Chunk { done, .. } => *done,
        }
    }
}

/// Client-side reply decoder. It tracks requests in flight because a simple
/// reply to a read carries data whose length only the request knows.
#[derive(Debug, Default, Clone)]
pub struct ReplyDecoder {
    in_flight: HashMap<u64, (Command, u32)>,
}

/// Largest structured chunk payload accepted: a maximal read plus slack,
/// or 2^20 block status descriptors.
const MAX_CHUNK: u32 = MAX_PAYLOAD + 4096;

impl ReplyDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a sent request so its reply can be decoded.
    pub fn expect(&mut self, cookie: u64, command: Command, length: u32) {
        self.in_flight.insert(cookie, (command, length));
    }

    /// Number of requests still waiting for their final reply.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Decode the next reply message, consuming exactly its bytes.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>, ProtocolError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        match magic {
            SIMPLE_REPLY_MAGIC => self.decode_simple(buf),
            STRUCTURED_REPLY_MAGIC => self.decode_chunk(buf),
            other => Err(ProtocolError::BadMagic {
                context: "reply",
                found: other.into(),
                expected: STRUCTURED_REPLY_MAGIC.into(),
            }),
        }
    }

    fn decode_simple(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>, ProtocolError> {
        if buf.len() < SIMPLE_REPLY_LEN {
            return Ok(None);
        }
        let mut h = &buf[4..SIMPLE_REPLY_LEN];
        let error = h.get_u32();
        let cookie = h.get_u64();
        let &(command, length) = self
            .in_flight
            .get(&cookie)
            .ok_or(ProtocolError::UnknownCookie(cookie))?;
        let data_len = if command == Command::Read && error == 0 {
            length as usize
        } else {
            0
        };
        if buf.len() < SIMPLE_REPLY_LEN + data_len {
            return Ok(None);
        }
        self.in_flight.remove(&cookie);
        buf.advance(SIMPLE_REPLY_LEN);
        let data = buf.split_to(data_len).freeze();
        Ok(Some(Reply::Simple {
            cookie,
            error,
            data,
        }))
    }

    fn decode_chunk(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>, ProtocolError> {
        if buf.len() < CHUNK_HEADER_LEN {
            return Ok(None);
        }
        let mut h = &buf[4..CHUNK_HEADER_LEN];
        let flags = h.get_u16();
        let kind = h.get_u16();
        let cookie = h.get_u64();
        let length = h.get_u32();
        if !self.in_flight.contains_key(&cookie) {
            return Err(ProtocolError::UnknownCookie(cookie));
        }
        if length > MAX_CHUNK {
            return Err(ProtocolError::TooLong {
                what: "reply chunk",
                len: length.into(),
                max: MAX_CHUNK.into(),
            });
        }
        if buf.len() < CHUNK_HEADER_LEN + length as usize {
            return Ok(None);
        }
        buf.advance(CHUNK_HEADER_LEN);
        let mut p = buf.split_to(length as usize).freeze();
        let chunk = parse_chunk(kind, &mut p)?;
        let done = flags & reply_flags::DONE != 0;
        if kind == reply_type::NONE && !done {
            return Err(ProtocolError::invalid(
                "reply chunk",
                "NONE chunk without DONE",
            ));
        }
        if done {
            self.in_flight.remove(&cookie);
        }
        Ok(Some(Reply::Chunk {
            cookie,
            done,
            chunk,
        }))
    }
}

fn parse_message(p: &mut Bytes, fixed_tail: usize) -> Result<(u32, String), ProtocolError> {
    if p.len() < 6 + fixed_tail {
        return Err(ProtocolError::invalid("error chunk", "too short"));
    }
    let error = p.get_u32();
    let mlen = p.get_u16() as usize;
    if mlen + fixed_tail > p.len() {
        return Err(ProtocolError::invalid(
            "error chunk",
            "message longer than chunk",
        ));
    }
    let message = String::from_utf8_lossy(&p.split_to(mlen)).into_owned();
    Ok((error, message))
}

fn parse_chunk(kind: u16, p: &mut Bytes) -> Result<Chunk, ProtocolError> {
    let bad = |d: &str| ProtocolError::invalid("reply chunk", format!("type {kind}: {d}"));
    match kind {
        reply_type::NONE if p.is_empty() => Ok(Chunk::None),
        reply_type::OFFSET_DATA if p.len() > 8 => {
            let offset = p.get_u64();
            Ok(Chunk::OffsetData {
                offset,
                data: std::mem::take(p),
            })
        }
        reply_type::OFFSET_HOLE if p.len() == 12 => {
            let offset = p.get_u64();
            let length = p.get_u32();
            if length == 0 {
                return Err(bad("empty hole"));
            }
            Ok(Chunk::OffsetHole { offset, length })
        }
        reply_type::BLOCK_STATUS if p.len() >= 12 && (p.len() - 4).is_multiple_of(8) => {
            let context_id = p.get_u32();
            let mut extents = Vec::with_capacity(p.len() / 8);
            while p.has_remaining() {
                let length = p.get_u32();
                let flags = p.get_u32();
                if length == 0 {
                    return Err(bad("zero-length extent"));
                }
                extents.push(BlockExtent { length, flags });
            }
            Ok(Chunk::BlockStatus {
                context_id,
                extents,
            })
        }
        reply_type::ERROR => {
            let (error, message) = parse_message(p, 0)?;
            Ok(Chunk::Error { error, message })
        }
        reply_type::ERROR_OFFSET => {
            let (error, message) = parse_message(p, 8)?;
            Ok(Chunk::ErrorOffset {
                error,
                message,
                offset: p.get_u64(),
            })
        }
        k if k & reply_type::ERR_BIT != 0 => {
            let (error, _) = parse_message(p, 0)?;
            Ok(Chunk::UnknownError { kind: k, error })
        }
        _ => Err(bad("unexpected type or length")),
    }
}
