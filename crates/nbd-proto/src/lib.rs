//! Sans-IO NBD protocol: handshake state machines (server and client side)
//! and the transmission codec, over `bytes`. No sockets, no async, no clocks.
//!
//! ```text
//!   bytes in ──▶ ServerHandshake::handle_input ──▶ Negotiated ──┐
//!   bytes out ◀─ ServerHandshake::poll_transmit                  │
//!                                                                ▼
//!   bytes in ──▶ RequestDecoder::decode ──▶ Incoming ──▶ check_request ──▶ (driver executes)
//!   bytes out ◀─ put_simple_reply / put_offset_data_header + data / put_* chunks
//!
//!   client:  ClientHandshake (handle_input/poll_transmit) ──▶ ClientNegotiated
//!            ClientTransmission::encode_request / decode_reply ──▶ Reply
//! ```
//!
//! Only fixed newstyle is spoken; oldstyle is refused on both sides. The
//! spec is `doc/proto.md` of the NetworkBlockDevice/nbd repository.
#![warn(missing_docs)]

mod client;
pub mod consts;
mod error;
mod reply;
mod request;
mod server;

pub use client::{BlockSize, ClientConfig, ClientHandshake, ClientNegotiated, ClientTransmission};
pub use error::ProtocolError;
pub use reply::{
    BlockExtent, Chunk, Reply, ReplyDecoder, allocation_flags, build_extents, put_block_status,
    put_chunk_header, put_error, put_error_offset, put_none, put_offset_data_header,
    put_offset_hole, put_simple_reply,
};
pub use request::{
    Command, Incoming, Request, RequestDecoder, RequestHeader, TransmissionInfo, check_request,
};
pub use server::{BASE_ALLOCATION_ID, ExportInfo, HandshakeOutcome, Negotiated, ServerHandshake};

#[cfg(test)]
mod tests;
