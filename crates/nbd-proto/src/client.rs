//! Client side: the fixed-newstyle handshake and request encoding, for
//! talking to remote NBD servers (remote replicas).
//!
//! ```text
//!  AwaitGreeting ─▶ [STRUCTURED_REPLY] ─▶ [SET_META_CONTEXT base:allocation] ─▶ GO ─▶ done
//!                                                     (GO unsupported ─▶ EXPORT_NAME ─▶ done)
//! ```
//! Drive it like the server side: `handle_input` with received bytes,
//! `poll_transmit` for bytes to send, until it returns [`ClientNegotiated`].
//! Then use [`ClientTransmission`] to encode requests and decode replies.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::consts::{
    BASE_ALLOCATION, IHAVEOPT, MAX_OPTION_DATA, NBDMAGIC, OLDSTYLE_MAGIC, OPTION_REPLY_MAGIC,
    client_flags, handshake_flags, info, opt, rep,
};
use crate::error::ProtocolError;
use crate::reply::{Reply, ReplyDecoder};
use crate::request::{Command, RequestHeader};

/// What the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Export name ("" for the default export).
    pub export: String,
    /// Try to negotiate structured replies.
    pub structured: bool,
    /// Try to select `base:allocation` (needs structured replies).
    pub base_allocation: bool,
}

/// Block size constraints advertised by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum block size.
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Maximum payload size.
    pub maximum: u32,
}

/// What the client handshake agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientNegotiated {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Structured replies are in use.
    pub structured: bool,
    /// Id of `base:allocation` if selected.
    pub base_allocation: Option<u32>,
    /// Block size constraints, if the server sent them.
    pub block_size: Option<BlockSize>,
    /// Canonical export name, if the server sent it.
    pub name: Option<String>,
    /// Export description, if the server sent it.
    pub description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitGreeting,
    AwaitStructured,
    AwaitMeta,
    AwaitGo,
    AwaitExportName,
    Finished,
}

/// The client handshake state machine.
#[derive(Debug)]
pub struct ClientHandshake {
    cfg: ClientConfig,
    out: BytesMut,
    state: State,
    no_zeroes: bool,
    result: ClientNegotiated,
}

impl ClientHandshake {
    /// Start a handshake; nothing is sent until the server greets.
    pub fn new(cfg: ClientConfig) -> Self {
        Self {
            cfg,
            out: BytesMut::new(),
            state: State::AwaitGreeting,
            no_zeroes: false,
            result: ClientNegotiated {
                size: 0,
                flags: 0,
                structured: false,
                base_allocation: None,
                block_size: None,
                name: None,
                description: None,
            },
        }
    }

    /// Bytes to send to the server, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.split().freeze())
        }
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        self.out.put_u64(IHAVEOPT);
        self.out.put_u32(option);
        self.out.put_u32(data.len() as u32);
        self.out.put_slice(data);
    }

    fn send_meta_or_go(&mut self) {
        if self.result.structured && self.cfg.base_allocation {
            let name = self.cfg.export.clone();
            let mut d = Vec::new();
            d.put_u32(name.len() as u32);
            d.put_slice(name.as_bytes());
            d.put_u32(1);
            d.put_u32(BASE_ALLOCATION.len() as u32);
            d.put_slice(BASE_ALLOCATION.as_bytes());
            self.option(opt::SET_META_CONTEXT, &d);
            self.state = State::AwaitMeta;
        } else {
            self.send_go();
        }
    }

    fn send_go(&mut self) {
        let name = self.cfg.export.clone();
        let mut d = Vec::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name.as_bytes());
        d.put_u16(3);
        d.put_u16(info::BLOCK_SIZE);
        d.put_u16(info::NAME);
        d.put_u16(info::DESCRIPTION);
        self.option(opt::GO, &d);
        self.state = State::AwaitGo;
    }

    /// Consume complete server messages from `input`; returns the result
    /// once transmission can start.
    pub fn handle_input(
        &mut self,
        input: &mut BytesMut,
    ) -> Result<Option<ClientNegotiated>, ProtocolError> {
        loop {
            match self.state {
                State::Finished => return Ok(None),
                State::AwaitGreeting => {
                    if input.len() < 18 {
                        return Ok(None);
                    }
                    let magic = input.get_u64();
                    if magic != NBDMAGIC {
                        return Err(ProtocolError::BadMagic {
                            context: "greeting",
                            found: magic,
                            expected: NBDMAGIC,
                        });
                    }
                    let magic = input.get_u64();
                    if magic == OLDSTYLE_MAGIC {
                        return Err(ProtocolError::Oldstyle);
                    }
                    if magic != IHAVEOPT {
                        return Err(ProtocolError::BadMagic {
                            context: "greeting",
                            found: magic,
                            expected: IHAVEOPT,
                        });
                    }
                    let hflags = input.get_u16();
                    if hflags & handshake_flags::FIXED_NEWSTYLE == 0 {
                        return Err(ProtocolError::ServerNotFixedNewstyle(hflags));
                    }
                    self.no_zeroes = hflags & handshake_flags::NO_ZEROES != 0;
                    let mut cflags = client_flags::FIXED_NEWSTYLE;
                    if self.no_zeroes {
                        cflags |= client_flags::NO_ZEROES;
                    }
                    self.out.put_u32(cflags);
                    if self.cfg.structured {
                        self.option(opt::STRUCTURED_REPLY, &[]);
                        self.state = State::AwaitStructured;
                    } else {
                        self.send_meta_or_go();
                    }
                }
                State::AwaitExportName => {
                    let need = if self.no_zeroes { 10 } else { 134 };
                    if input.len() < need {
                        return Ok(None);
                    }
                    self.result.size = input.get_u64();
                    self.result.flags = input.get_u16();
                    input.advance(need - 10);
                    self.result.base_allocation = None;
                    self.state = State::Finished;
                    return Ok(Some(self.result.clone()));
                }
                _ => {
                    let Some((option, kind, data)) = take_option_reply(input)? else {
                        return Ok(None);
                    };
                    if let Some(done) = self.handle_reply(option, kind, data)? {
                        self.state = State::Finished;
                        return Ok(Some(done));
                    }
                }
            }
        }
    }

    fn handle_reply(
        &mut self,
        option: u32,
        kind: u32,
        mut data: Bytes,
    ) -> Result<Option<ClientNegotiated>, ProtocolError> {
        let expected = match self.state {
            State::AwaitStructured => opt::STRUCTURED_REPLY,
            State::AwaitMeta => opt::SET_META_CONTEXT,
            _ => opt::GO,
        };
        if option != expected {
            return Err(ProtocolError::invalid(
                "option reply",
                format!("reply to option {option}, expected {expected}"),
            ));
        }
        let refused = |data: &Bytes| ProtocolError::OptionRefused {
            option,
            reply: kind,
            message: String::from_utf8_lossy(data).into_owned(),
        };
        match (self.state, kind) {
            (State::AwaitStructured, rep::ACK) => {
                self.result.structured = true;
                self.send_meta_or_go();
            }
            (State::AwaitStructured, k) if k & rep::ERR_BIT != 0 => self.send_meta_or_go(),
            (State::AwaitMeta, rep::META_CONTEXT) => {
                if data.len() < 4 {
                    return Err(ProtocolError::invalid("meta context reply", "too short"));
                }
                let id = data.get_u32();
                if &data[..] == BASE_ALLOCATION.as_bytes() {
                    self.result.base_allocation = Some(id);
                }
            }
            (State::AwaitMeta, rep::ACK) => self.send_go(),
            (State::AwaitMeta, k) if k & rep::ERR_BIT != 0 => {
                self.result.base_allocation = None;
                self.send_go();
            }
            (State::AwaitGo, rep::INFO) => self.handle_info(data)?,
            (State::AwaitGo, rep::ACK) => {
                if self.result.flags == 0 {
                    return Err(ProtocolError::invalid(
                        "NBD_OPT_GO reply",
                        "no NBD_INFO_EXPORT",
                    ));
                }
                return Ok(Some(self.result.clone()));
            }
            (State::AwaitGo, rep::ERR_UNSUP) => {
                let name = self.cfg.export.clone();
                self.option(opt::EXPORT_NAME, name.as_bytes());
                self.state = State::AwaitExportName;
            }
            (_, k) if k & rep::ERR_BIT != 0 => return Err(refused(&data)),
            (_, k) => {
                return Err(ProtocolError::invalid(
                    "option reply",
                    format!("unexpected reply type {k:#x} to option {option}"),
                ));
            }
        }
        Ok(None)
    }

    fn handle_info(&mut self, mut data: Bytes) -> Result<(), ProtocolError> {
        if data.len() < 2 {
            return Err(ProtocolError::invalid("NBD_REP_INFO", "too short"));
        }
        let kind = data.get_u16();
        match kind {
            info::EXPORT if data.len() == 10 => {
                self.result.size = data.get_u64();
                self.result.flags = data.get_u16();
            }
            info::NAME => self.result.name = Some(String::from_utf8_lossy(&data).into_owned()),
            info::DESCRIPTION => {
                self.result.description = Some(String::from_utf8_lossy(&data).into_owned());
            }
            info::BLOCK_SIZE if data.len() == 12 => {
                self.result.block_size = Some(BlockSize {
                    minimum: data.get_u32(),
                    preferred: data.get_u32(),
                    maximum: data.get_u32(),
                });
            }
            info::EXPORT | info::BLOCK_SIZE => {
                return Err(ProtocolError::invalid(
                    "NBD_REP_INFO",
                    format!("bad length for {kind}"),
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Split one option reply off `input`: `(option, reply type, data)`.
fn take_option_reply(input: &mut BytesMut) -> Result<Option<(u32, u32, Bytes)>, ProtocolError> {
    if input.len() < 20 {
        return Ok(None);
    }
    let mut h = &input[..20];
    let magic = h.get_u64();
    let option = h.get_u32();
    let kind = h.get_u32();
    let len = h.get_u32();
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtocolError::BadMagic {
            context: "option reply",
            found: magic,
            expected: OPTION_REPLY_MAGIC,
        });
    }
    if len > MAX_OPTION_DATA {
        return Err(ProtocolError::TooLong {
            what: "option reply",
            len: len.into(),
            max: MAX_OPTION_DATA.into(),
        });
    }
    if input.len() < 20 + len as usize {
        return Ok(None);
    }
    input.advance(20);
    Ok(Some((option, kind, input.split_to(len as usize).freeze())))
}

/// Transmission phase, client side: cookie allocation, request encoding and
/// reply decoding.
#[derive(Debug, Default)]
pub struct ClientTransmission {
    next_cookie: u64,
    replies: ReplyDecoder,
}

impl ClientTransmission {
    /// A fresh transmission state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a request header to `out` and return its cookie. For
    /// [`Command::Write`] the caller appends `length` payload bytes next.
    /// `NBD_CMD_DISC` expects no reply.
    pub fn encode_request(
        &mut self,
        out: &mut BytesMut,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(out);
        if command != Command::Disc {
            self.replies.expect(cookie, command, length);
        }
        cookie
    }

    /// Decode the next reply message (see [`ReplyDecoder::decode`]).
    pub fn decode_reply(&mut self, input: &mut BytesMut) -> Result<Option<Reply>, ProtocolError> {
        self.replies.decode(input)
    }

    /// Requests still waiting for their final reply.
    pub fn in_flight(&self) -> usize {
        self.replies.in_flight()
    }
}
