//! Protocol errors: each one means the peer broke the protocol (or refused
//! us) and the connection should be closed.

/// A protocol violation or refusal; the connection cannot continue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A magic number did not match.
    #[error("bad magic {found:#x} in {context} (expected {expected:#x})")]
    BadMagic {
        /// Which message was being decoded.
        context: &'static str,
        /// The value received.
        found: u64,
        /// The value required.
        expected: u64,
    },
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE`; only fixed newstyle is served.
    #[error("client did not ask for fixed newstyle (client flags {0:#x})")]
    NotFixedNewstyle(u32),
    /// The client set flags the server did not offer.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// The server only speaks oldstyle or non-fixed newstyle.
    #[error("server does not speak fixed newstyle (handshake flags {0:#x})")]
    ServerNotFixedNewstyle(u16),
    /// The server greeted with the oldstyle handshake.
    #[error("server uses the oldstyle handshake, which is not supported")]
    Oldstyle,
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist; the spec
    /// leaves a hard disconnect as the only answer.
    #[error("unknown export {0:?} requested with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    /// A length field was larger than this implementation allows.
    #[error("{what} length {len} exceeds the limit {max}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// The length received.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A message was well framed but its content is invalid.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// Which message.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The server refused an option the client needs.
    #[error("server refused option {option}: reply type {reply:#x}{}", fmt_msg(.message))]
    OptionRefused {
        /// The option code.
        option: u32,
        /// The error reply type.
        reply: u32,
        /// The server's message, if any.
        message: String,
    },
    /// A reply carried a cookie with no request in flight.
    #[error("reply for unknown cookie {0:#x}")]
    UnknownCookie(u64),
}

fn fmt_msg(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(" ({m})")
    }
}

impl ProtocolError {
    pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        Self::Invalid {
            what,
            detail: detail.into(),
        }
    }
}
