//! Server side of the fixed-newstyle handshake.
//!
//! ```text
//!  new() ─ greeting queued ─▶ AwaitClientFlags ─▶ Options ⟲ (INFO, LIST, STRUCTURED_REPLY,
//!                                                   │        LIST/SET_META_CONTEXT, unknown)
//!                                                   ├─ GO + ACK / EXPORT_NAME ─▶ Negotiated
//!                                                   └─ ABORT ─▶ Aborted
//! ```
//! Feed received bytes to [`ServerHandshake::handle_input`], send whatever
//! [`ServerHandshake::poll_transmit`] returns, and stop when an outcome is
//! returned (then send the final output). An `Err` means hard disconnect.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::consts::{
    BASE_ALLOCATION, IHAVEOPT, MAX_OPTION_DATA, MAX_PAYLOAD, MAX_STRING, MIN_BLOCK_SIZE, NBDMAGIC,
    OPTION_REPLY_MAGIC, PREFERRED_BLOCK_SIZE, client_flags, handshake_flags, info, opt, rep,
    transmission_flags,
};
use crate::error::ProtocolError;

/// Metadata context id the server assigns to `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// One export in the server's catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Name clients ask for. The empty name always maps to the first export.
    pub name: String,
    /// Human-readable description (sent on request when non-empty).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`consts::transmission_flags`); `HAS_FLAGS` is added.
    pub flags: u16,
}

/// What the handshake agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Index into the export list.
    pub export: usize,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Structured replies are in use.
    pub structured: bool,
    /// Id of `base:allocation` if the client selected it for this export.
    pub base_allocation: Option<u32>,
    /// The client asked for no zero padding.
    pub no_zeroes: bool,
    /// The client promised to honour the block size constraints (asked for
    /// `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO`).
    pub block_size_requested: bool,
}

/// How the handshake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeOutcome {
    /// Transmission starts now.
    Negotiated(Negotiated),
    /// The client sent `NBD_OPT_ABORT` (our ACK is queued): close after sending.
    Aborted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitClientFlags,
    Options,
    Finished,
}

/// The server handshake state machine.
#[derive(Debug)]
pub struct ServerHandshake {
    exports: Vec<ExportInfo>,
    out: BytesMut,
    state: State,
    structured: bool,
    no_zeroes: bool,
    /// Result of the last `SET_META_CONTEXT`: export index and selected id.
    meta: Option<(usize, Option<u32>)>,
}

/// Parsed `NBD_OPT_INFO` / `NBD_OPT_GO` data.
struct InfoRequest {
    name: String,
    requests: Vec<u16>,
}

impl ServerHandshake {
    /// Start a handshake offering `exports`; the greeting is queued at once.
    pub fn new(exports: Vec<ExportInfo>) -> Self {
        let mut out = BytesMut::with_capacity(256);
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
        Self {
            exports,
            out,
            state: State::AwaitClientFlags,
            structured: false,
            no_zeroes: false,
            meta: None,
        }
    }

    /// The catalogue this handshake serves.
    pub fn exports(&self) -> &[ExportInfo] {
        &self.exports
    }

    /// Bytes to send to the client, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.split().freeze())
        }
    }

    /// Consume as much of `input` as forms complete messages. Returns the
    /// outcome once the handshake ends (bytes after it stay in `input`).
    pub fn handle_input(
        &mut self,
        input: &mut BytesMut,
    ) -> Result<Option<HandshakeOutcome>, ProtocolError> {
        loop {
            match self.state {
                State::Finished => return Ok(None),
                State::AwaitClientFlags => {
                    if input.len() < 4 {
                        return Ok(None);
                    }
                    let flags = input.get_u32();
                    if flags & client_flags::FIXED_NEWSTYLE == 0 {
                        return Err(ProtocolError::NotFixedNewstyle(flags));
                    }
                    if flags & !(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES) != 0 {
                        return Err(ProtocolError::UnknownClientFlags(flags));
                    }
                    self.no_zeroes = flags & client_flags::NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Options => {
                    if input.len() < 16 {
                        return Ok(None);
                    }
                    let mut h = &input[..16];
                    let magic = h.get_u64();
                    let option = h.get_u32();
                    let len = h.get_u32();
                    if magic != IHAVEOPT {
                        return Err(ProtocolError::BadMagic {
                            context: "option",
                            found: magic,
                            expected: IHAVEOPT,
                        });
                    }
                    if len > MAX_OPTION_DATA {
                        return Err(ProtocolError::TooLong {
                            what: "option data",
                            len: len.into(),
                            max: MAX_OPTION_DATA.into(),
                        });
                    }
                    if input.len() < 16 + len as usize {
                        return Ok(None);
                    }
                    input.advance(16);
                    let data = input.split_to(len as usize).freeze();
                    if let Some(outcome) = self.handle_option(option, data)? {
                        self.state = State::Finished;
                        return Ok(Some(outcome));
                    }
                }
            }
        }
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.out.put_u64(OPTION_REPLY_MAGIC);
        self.out.put_u32(option);
        self.out.put_u32(kind);
        self.out.put_u32(data.len() as u32);
        self.out.put_slice(data);
    }

    fn error(&mut self, option: u32, kind: u32, message: &str) {
        self.reply(option, kind, message.as_bytes());
    }

    fn find_export(&self, name: &str) -> Option<usize> {
        let exact = self.exports.iter().position(|e| e.name == name);
        match exact {
            Some(i) => Some(i),
            None if name.is_empty() && !self.exports.is_empty() => Some(0),
            None => None,
        }
    }

    fn flags_for(&self, export: usize) -> u16 {
        let mut flags = self.exports[export].flags | transmission_flags::HAS_FLAGS;
        if !self.structured {
            flags &= !transmission_flags::SEND_DF;
        }
        flags
    }

    fn handle_option(
        &mut self,
        option: u32,
        data: Bytes,
    ) -> Result<Option<HandshakeOutcome>, ProtocolError> {
        match option {
            opt::EXPORT_NAME => self.export_name(data).map(Some),
            opt::ABORT => {
                self.reply(option, rep::ACK, &[]);
                Ok(Some(HandshakeOutcome::Aborted))
            }
            opt::LIST => {
                if !data.is_empty() {
                    self.error(option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Ok(None);
                }
                for i in 0..self.exports.len() {
                    let name = self.exports[i].name.clone();
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.put_u32(name.len() as u32);
                    d.put_slice(name.as_bytes());
                    self.reply(option, rep::SERVER, &d);
                }
                self.reply(option, rep::ACK, &[]);
                Ok(None)
            }
            opt::STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured = true;
                    self.reply(option, rep::ACK, &[]);
                } else {
                    self.error(
                        option,
                        rep::ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
                Ok(None)
            }
            opt::INFO | opt::GO => Ok(self.info_or_go(option, data)),
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, data);
                Ok(None)
            }
            _ => {
                self.error(option, rep::ERR_UNSUP, "option not supported");
                Ok(None)
            }
        }
    }

    fn export_name(&mut self, data: Bytes) -> Result<HandshakeOutcome, ProtocolError> {
        let name = String::from_utf8_lossy(&data).into_owned();
        let export = self
            .find_export(&name)
            .ok_or(ProtocolError::UnknownExport(name))?;
        let flags = self.flags_for(export);
        self.out.put_u64(self.exports[export].size);
        self.out.put_u16(flags);
        if !self.no_zeroes {
            self.out.put_bytes(0, 124);
        }
        Ok(HandshakeOutcome::Negotiated(
            self.negotiated(export, flags, false),
        ))
    }

    fn negotiated(&self, export: usize, flags: u16, block_size_requested: bool) -> Negotiated {
        let base_allocation = match self.meta {
            Some((i, id)) if i == export && self.structured => id,
            _ => None,
        };
        Negotiated {
            export,
            flags,
            structured: self.structured,
            base_allocation,
            no_zeroes: self.no_zeroes,
            block_size_requested,
        }
    }

    fn parse_info(mut data: Bytes) -> Option<InfoRequest> {
        if data.len() < 6 {
            return None;
        }
        let name_len = data.get_u32() as usize;
        if name_len > MAX_STRING || name_len + 2 > data.len() {
            return None;
        }
        let name = String::from_utf8(data.split_to(name_len).to_vec()).ok()?;
        let n = data.get_u16() as usize;
        if data.len() != 2 * n {
            return None;
        }
        let requests = (0..n).map(|_| data.get_u16()).collect();
        Some(InfoRequest { name, requests })
    }

    fn info_or_go(&mut self, option: u32, data: Bytes) -> Option<HandshakeOutcome> {
        let Some(req) = Self::parse_info(data) else {
            self.error(option, rep::ERR_INVALID, "malformed NBD_OPT_INFO/GO data");
            return None;
        };
        let Some(export) = self.find_export(&req.name) else {
            self.error(option, rep::ERR_UNKNOWN, "no such export");
            return None;
        };
        let flags = self.flags_for(export);
        let e = self.exports[export].clone();
        let mut d = Vec::with_capacity(16);
        d.put_u16(info::EXPORT);
        d.put_u64(e.size);
        d.put_u16(flags);
        self.reply(option, rep::INFO, &d);
        if req.requests.contains(&info::NAME) {
            let mut d = Vec::with_capacity(2 + e.name.len());
            d.put_u16(info::NAME);
            d.put_slice(e.name.as_bytes());
            self.reply(option, rep::INFO, &d);
        }
        if req.requests.contains(&info::DESCRIPTION) && !e.description.is_empty() {
            let mut d = Vec::with_capacity(2 + e.description.len());
            d.put_u16(info::DESCRIPTION);
            d.put_slice(e.description.as_bytes());
            self.reply(option, rep::INFO, &d);
        }
        let mut d = Vec::with_capacity(14);
        d.put_u16(info::BLOCK_SIZE);
        d.put_u32(MIN_BLOCK_SIZE);
        d.put_u32(PREFERRED_BLOCK_SIZE);
        d.put_u32(MAX_PAYLOAD);
        self.reply(option, rep::INFO, &d);
        self.reply(option, rep::ACK, &[]);
        if option != opt::GO {
            return None;
        }
        let asked = req.requests.contains(&info::BLOCK_SIZE);
        Some(HandshakeOutcome::Negotiated(
            self.negotiated(export, flags, asked),
        ))
    }

    fn parse_meta(mut data: Bytes) -> Option<(String, Vec<String>)> {
        if data.len() < 8 {
            return None;
        }
        let name_len = data.get_u32() as usize;
        if name_len > MAX_STRING || name_len + 4 > data.len() {
            return None;
        }
        let name = String::from_utf8(data.split_to(name_len).to_vec()).ok()?;
        let n = data.get_u32() as usize;
        let mut queries = Vec::new();
        for _ in 0..n {
            if data.len() < 4 {
                return None;
            }
            let len = data.get_u32() as usize;
            if len > MAX_STRING || len > data.len() {
                return None;
            }
            queries.push(String::from_utf8(data.split_to(len).to_vec()).ok()?);
        }
        data.is_empty().then_some((name, queries))
    }

    fn meta_context(&mut self, option: u32, data: Bytes) {
        let set = option == opt::SET_META_CONTEXT;
        if set {
            self.meta = None;
        }
        if set && !self.structured {
            self.error(
                option,
                rep::ERR_INVALID,
                "negotiate structured replies first",
            );
            return;
        }
        let Some((name, queries)) = Self::parse_meta(data) else {
            self.error(option, rep::ERR_INVALID, "malformed meta context request");
            return;
        };
        let Some(export) = self.find_export(&name) else {
            self.error(option, rep::ERR_UNKNOWN, "no such export");
            return;
        };
        let matches = if set {
            queries.iter().any(|q| q == BASE_ALLOCATION)
        } else {
            queries.is_empty() || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
        };
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        if matches {
            let mut d = Vec::with_capacity(4 + BASE_ALLOCATION.len());
            d.put_u32(id);
            d.put_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, rep::META_CONTEXT, &d);
        }
        if set {
            self.meta = Some((export, matches.then_some(id)));
        }
        self.reply(option, rep::ACK, &[]);
    }
}
