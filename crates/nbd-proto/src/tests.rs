//! Byte-level tests of the handshake and codec, and client ↔ server runs in memory.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use crate::consts::*;
use crate::*;

fn exports() -> Vec<ExportInfo> {
    vec![
        ExportInfo {
            name: "vda".into(),
            description: "test disk".into(),
            size: 1 << 20,
            flags: transmission_flags::SEND_FLUSH | transmission_flags::SEND_FUA,
        },
        ExportInfo {
            name: "other".into(),
            description: String::new(),
            size: 4096,
            flags: 0,
        },
    ]
}

/// A server past the greeting, with the client flags already consumed.
fn server_after_flags(cflags: u32) -> ServerHandshake {
    let mut s = ServerHandshake::new(exports());
    s.poll_transmit();
    let mut input = BytesMut::new();
    input.put_u32(cflags);
    s.handle_input(&mut input).unwrap();
    s
}

fn fixed() -> u32 {
    client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES
}

fn option(code: u32, data: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u64(IHAVEOPT);
    b.put_u32(code);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b
}

fn option_reply(code: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.put_u64(OPTION_REPLY_MAGIC);
    b.put_u32(code);
    b.put_u32(kind);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.put_u32(name.len() as u32);
    d.put_slice(name.as_bytes());
    d.put_u16(infos.len() as u16);
    for i in infos {
        d.put_u16(*i);
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.put_u32(name.len() as u32);
    d.put_slice(name.as_bytes());
    d.put_u32(queries.len() as u32);
    for q in queries {
        d.put_u32(q.len() as u32);
        d.put_slice(q.as_bytes());
    }
    d
}

fn out(s: &mut ServerHandshake) -> Vec<u8> {
    s.poll_transmit().map(|b| b.to_vec()).unwrap_or_default()
}

#[test]
fn greeting_is_nbdmagic_ihaveopt_fixed_newstyle_no_zeroes() {
    let mut s = ServerHandshake::new(exports());

    let greeting = out(&mut s);

    assert_eq!(greeting, b"NBDMAGICIHAVEOPT\x00\x03");
}

#[test]
fn client_without_fixed_newstyle_is_refused() {
    let mut s = ServerHandshake::new(exports());
    let mut input = BytesMut::from(&[0u8, 0, 0, 0][..]);

    let r = s.handle_input(&mut input);

    assert_eq!(r, Err(ProtocolError::NotFixedNewstyle(0)));
}

#[test]
fn client_with_unknown_flags_is_refused() {
    let mut s = ServerHandshake::new(exports());
    let mut input = BytesMut::from(&[0u8, 0, 0, 5][..]);

    let r = s.handle_input(&mut input);

    assert_eq!(r, Err(ProtocolError::UnknownClientFlags(5)));
}

#[test]
fn export_name_with_no_zeroes_sends_size_and_flags_only() {
    let mut s = server_after_flags(fixed());
    let mut input = option(opt::EXPORT_NAME, b"vda");

    let outcome = s.handle_input(&mut input).unwrap();

    let mut expected = Vec::new();
    expected.put_u64(1 << 20);
    expected.put_u16(
        transmission_flags::HAS_FLAGS
            | transmission_flags::SEND_FLUSH
            | transmission_flags::SEND_FUA,
    );
    assert_eq!(out(&mut s), expected);
    assert!(
        matches!(outcome, Some(HandshakeOutcome::Negotiated(n)) if n.export == 0 && n.no_zeroes)
    );
}

#[test]
fn export_name_without_no_zeroes_pads_124_zero_bytes() {
    let mut s = server_after_flags(client_flags::FIXED_NEWSTYLE);
    let mut input = option(opt::EXPORT_NAME, b"");

    s.handle_input(&mut input).unwrap();

    assert_eq!(out(&mut s).len(), 8 + 2 + 124);
}

#[test]
fn export_name_of_unknown_export_disconnects() {
    let mut s = server_after_flags(fixed());
    let mut input = option(opt::EXPORT_NAME, b"nope");

    let r = s.handle_input(&mut input);

    assert_eq!(r, Err(ProtocolError::UnknownExport("nope".into())));
}

#[test]
fn go_replies_export_name_description_block_size_then_ack() {
    let mut s = server_after_flags(fixed());
    let data = go_data("vda", &[info::NAME, info::DESCRIPTION, info::BLOCK_SIZE]);
    let mut input = option(opt::GO, &data);

    let outcome = s.handle_input(&mut input).unwrap();

    let mut expected = Vec::new();
    let mut d = Vec::new();
    d.put_u16(info::EXPORT);
    d.put_u64(1 << 20);
    d.put_u16(0b1101);
    expected.extend(option_reply(opt::GO, rep::INFO, &d));
    expected.extend(option_reply(opt::GO, rep::INFO, b"\x00\x01vda"));
    expected.extend(option_reply(opt::GO, rep::INFO, b"\x00\x02test disk"));
    let mut d = Vec::new();
    d.put_u16(info::BLOCK_SIZE);
    d.put_u32(1);
    d.put_u32(4096);
    d.put_u32(32 << 20);
    expected.extend(option_reply(opt::GO, rep::INFO, &d));
    expected.extend(option_reply(opt::GO, rep::ACK, &[]));
    assert_eq!(out(&mut s), expected);
    let Some(HandshakeOutcome::Negotiated(n)) = outcome else {
        panic!("not negotiated")
    };
    assert!(n.block_size_requested);
}

#[test]
fn info_replies_and_keeps_negotiating() {
    let mut s = server_after_flags(fixed());
    let mut input = option(opt::INFO, &go_data("", &[]));

    let outcome = s.handle_input(&mut input).unwrap();

    assert_eq!(outcome, None);
    assert!(out(&mut s).ends_with(&option_reply(opt::INFO, rep::ACK, &[])));
}

#[test]
fn go_for_unknown_export_replies_err_unknown() {
    let mut s = server_after_flags(fixed());
    let mut input = option(opt::GO, &go_data("nope", &[]));

    let outcome = s.handle_input(&mut input).unwrap();

    assert_eq!(outcome, None);
    assert_eq!(out(&mut s)[12..16], rep::ERR_UNKNOWN.to_be_bytes());
}

#[test]
fn go_with_bad_name_length_replies_err_invalid() {
    let mut s = server_after_flags(fixed());
    let mut data = go_data("vda", &[]);
    data[3] = 200;
    let mut input = option(opt::GO, &data);

    s.handle_input(&mut input).unwrap();

    assert_eq!(out(&mut s)[12..16], rep::ERR_INVALID.to_be_bytes());
}

#[test]
fn list_sends_one_server_reply_per_export_then_ack() {
    let mut s = server_after_flags(fixed());
    let mut input = option(opt::LIST, &[]);

    s.handle_input(&mut input).unwrap();

    let mut expected = option_reply(opt::LIST, rep::SERVER, b"\x00\x00\x00\x03vda");
    expected.extend(option_reply(
        opt::LIST,
        rep::SERVER,
        b"\x00\x00\x00\x05other",
    ));
    expected.extend(option_reply(opt::LIST, rep::ACK, &[]));
    assert_eq!(out(&mut s), expected);
}

#[test]
fn abort_is_acked_and_ends_the_handshake() {
    let mut s = server_after_flags(fixed());
    let mut input = option(opt::ABORT, &[]);

    let outcome = s.handle_input(&mut input).unwrap();

    assert_eq!(outcome, Some(HandshakeOutcome::Aborted));
    assert_eq!(out(&mut s), option_reply(opt::ABORT, rep::ACK, &[]));
}

#[test]
fn unknown_option_replies_err_unsup() {
    let mut s = server_after_flags(fixed());
    let mut input = option(opt::STARTTLS, &[]);

    s.handle_input(&mut input).unwrap();

    assert_eq!(
        out(&mut s),
        option_reply(opt::STARTTLS, rep::ERR_UNSUP, b"option not supported")
    );
}

#[test]
fn oversized_option_disconnects_before_its_data_arrives() {
    let mut s = server_after_flags(fixed());
    let mut input = BytesMut::new();
    input.put_u64(IHAVEOPT);
    input.put_u32(opt::GO);
    input.put_u32(u32::MAX);

    let r = s.handle_input(&mut input);

    assert!(matches!(r, Err(ProtocolError::TooLong { .. })));
}

#[test]
fn set_meta_context_without_structured_replies_err_invalid() {
    let mut s = server_after_flags(fixed());
    let mut input = option(opt::SET_META_CONTEXT, &meta_data("vda", &[BASE_ALLOCATION]));

    s.handle_input(&mut input).unwrap();

    assert_eq!(out(&mut s)[12..16], rep::ERR_INVALID.to_be_bytes());
}

#[test]
fn set_meta_context_selects_base_allocation_for_go() {
    let mut s = server_after_flags(fixed());
    let mut input = option(opt::STRUCTURED_REPLY, &[]);
    input.extend(option(
        opt::SET_META_CONTEXT,
        &meta_data("vda", &[BASE_ALLOCATION, "x:y"]),
    ));
    input.extend(option(opt::GO, &go_data("vda", &[])));

    let outcome = s.handle_input(&mut input).unwrap();

    let mut ctx = vec![0, 0, 0, 1];
    ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
    let replies = out(&mut s);
    let expected = [
        option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]),
        option_reply(opt::SET_META_CONTEXT, rep::META_CONTEXT, &ctx),
        option_reply(opt::SET_META_CONTEXT, rep::ACK, &[]),
    ]
    .concat();
    assert_eq!(replies[..expected.len()], expected[..]);
    let Some(HandshakeOutcome::Negotiated(n)) = outcome else {
        panic!("not negotiated")
    };
    assert_eq!(
        (n.structured, n.base_allocation),
        (true, Some(BASE_ALLOCATION_ID))
    );
}

#[test]
fn meta_context_set_for_another_export_is_not_used() {
    let mut s = server_after_flags(fixed());
    let mut input = option(opt::STRUCTURED_REPLY, &[]);
    input.extend(option(
        opt::SET_META_CONTEXT,
        &meta_data("other", &[BASE_ALLOCATION]),
    ));
    input.extend(option(opt::GO, &go_data("vda", &[])));

    let outcome = s.handle_input(&mut input).unwrap();

    let Some(HandshakeOutcome::Negotiated(n)) = outcome else {
        panic!("not negotiated")
    };
    assert_eq!(n.base_allocation, None);
}

#[test]
fn list_meta_context_base_wildcard_lists_base_allocation() {
    let mut s = server_after_flags(fixed());
    let mut input = option(opt::LIST_META_CONTEXT, &meta_data("", &["base:"]));

    s.handle_input(&mut input).unwrap();

    let mut ctx = vec![0, 0, 0, 0];
    ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
    let mut expected = option_reply(opt::LIST_META_CONTEXT, rep::META_CONTEXT, &ctx);
    expected.extend(option_reply(opt::LIST_META_CONTEXT, rep::ACK, &[]));
    assert_eq!(out(&mut s), expected);
}

#[test]
fn partial_option_waits_for_more_input() {
    let mut s = server_after_flags(fixed());
    let full = option(opt::GO, &go_data("vda", &[]));
    let mut input = BytesMut::from(&full[..full.len() - 1]);

    let outcome = s.handle_input(&mut input).unwrap();

    assert_eq!(
        (outcome, input.len(), s.poll_transmit()),
        (None, full.len() - 1, None)
    );
}

/// Run a client and a server against each other, feeding `step` bytes at a time.
fn run_pair(cfg: ClientConfig, step: usize) -> (ClientNegotiated, Negotiated) {
    let mut server = ServerHandshake::new(exports());
    let mut client = ClientHandshake::new(cfg);
    let (mut to_client, mut to_server) = (BytesMut::new(), BytesMut::new());
    let (mut c_in, mut s_in) = (BytesMut::new(), BytesMut::new());
    let (mut c_done, mut s_done) = (None, None);
    for _ in 0..100_000 {
        if let Some(b) = server.poll_transmit() {
            to_client.extend_from_slice(&b);
        }
        if let Some(b) = client.poll_transmit() {
            to_server.extend_from_slice(&b);
        }
        let n = step.min(to_client.len());
        c_in.extend_from_slice(&to_client.split_to(n));
        let n = step.min(to_server.len());
        s_in.extend_from_slice(&to_server.split_to(n));
        if let Some(r) = client.handle_input(&mut c_in).unwrap() {
            c_done = Some(r);
        }
        if let Some(HandshakeOutcome::Negotiated(n)) = server.handle_input(&mut s_in).unwrap() {
            s_done = Some(n);
        }
        if let (Some(c), Some(s)) = (&c_done, &s_done) {
            return (c.clone(), s.clone());
        }
    }
    panic!("handshake did not finish");
}

fn full_cfg() -> ClientConfig {
    ClientConfig {
        export: "vda".into(),
        structured: true,
        base_allocation: true,
    }
}

#[test]
fn client_and_server_agree_on_structured_and_base_allocation() {
    let (c, s) = run_pair(full_cfg(), usize::MAX);

    assert_eq!(
        (c.structured, c.base_allocation),
        (s.structured, s.base_allocation)
    );
    assert_eq!(
        (c.structured, c.base_allocation),
        (true, Some(BASE_ALLOCATION_ID))
    );
}

#[test]
fn client_learns_size_flags_name_description_and_block_size() {
    let (c, s) = run_pair(full_cfg(), usize::MAX);

    assert_eq!((c.size, c.flags), (1 << 20, s.flags));
    assert_eq!(
        (c.name.as_deref(), c.description.as_deref()),
        (Some("vda"), Some("test disk"))
    );
    assert_eq!(
        c.block_size,
        Some(BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20
        })
    );
}

#[test]
fn handshake_completes_when_fed_one_byte_at_a_time() {
    let (c, _) = run_pair(full_cfg(), 1);

    assert_eq!(c.base_allocation, Some(BASE_ALLOCATION_ID));
}

#[test]
fn client_without_structured_gets_simple_replies_only() {
    let cfg = ClientConfig {
        export: String::new(),
        structured: false,
        base_allocation: true,
    };

    let (c, s) = run_pair(cfg, usize::MAX);

    assert_eq!(
        (c.structured, s.structured, c.base_allocation),
        (false, false, None)
    );
}

#[test]
fn client_refuses_oldstyle_server() {
    let mut client = ClientHandshake::new(full_cfg());
    let mut input = BytesMut::new();
    input.put_u64(NBDMAGIC);
    input.put_u64(OLDSTYLE_MAGIC);
    input.put_u16(0);

    let r = client.handle_input(&mut input);

    assert_eq!(r, Err(ProtocolError::Oldstyle));
}

#[test]
fn client_reports_unknown_export() {
    let mut server = ServerHandshake::new(exports());
    let mut client = ClientHandshake::new(ClientConfig {
        export: "nope".into(),
        structured: false,
        base_allocation: false,
    });
    let mut c_in = BytesMut::from(&server.poll_transmit().unwrap()[..]);
    client.handle_input(&mut c_in).unwrap();
    let mut s_in = BytesMut::from(&client.poll_transmit().unwrap()[..]);
    server.handle_input(&mut s_in).unwrap();
    let mut c_in = BytesMut::from(&server.poll_transmit().unwrap()[..]);

    let r = client.handle_input(&mut c_in);

    assert!(matches!(
        r,
        Err(ProtocolError::OptionRefused {
            reply: rep::ERR_UNKNOWN,
            ..
        })
    ));
}

// ---- transmission codec ----

fn header(command: Command, length: u32) -> RequestHeader {
    RequestHeader {
        flags: 0,
        command,
        cookie: 7,
        offset: 4096,
        length,
    }
}

#[test]
fn request_header_encodes_to_28_big_endian_bytes() {
    let mut b = BytesMut::new();

    RequestHeader {
        flags: 1,
        command: Command::Write,
        cookie: 2,
        offset: 3,
        length: 4,
    }
    .encode(&mut b);

    let expected: &[u8] =
        b"\x25\x60\x95\x13\x00\x01\x00\x01\0\0\0\0\0\0\0\x02\0\0\0\0\0\0\0\x03\0\0\0\x04";
    assert_eq!(&b[..], expected);
}

#[test]
fn request_with_bad_magic_is_an_error() {
    let mut b = BytesMut::from(&[0u8; 28][..]);

    let r = RequestDecoder::new(MAX_PAYLOAD).decode(&mut b);

    assert!(matches!(r, Err(ProtocolError::BadMagic { found: 0, .. })));
}

#[test]
fn write_waits_for_its_whole_payload() {
    let mut b = BytesMut::new();
    header(Command::Write, 10).encode(&mut b);
    b.put_slice(&[1; 9]);
    let mut d = RequestDecoder::new(MAX_PAYLOAD);

    let r = d.decode(&mut b).unwrap();

    assert_eq!((r, b.len(), d.bytes_wanted(&b)), (None, 37, 38));
}

#[test]
fn write_payload_is_split_off_after_the_header() {
    let mut b = BytesMut::new();
    header(Command::Write, 3).encode(&mut b);
    b.put_slice(b"abcXYZ");

    let r = RequestDecoder::new(MAX_PAYLOAD).decode(&mut b).unwrap();

    let expected = Request {
        header: header(Command::Write, 3),
        payload: Bytes::from_static(b"abc"),
    };
    assert_eq!(
        (r, &b[..]),
        (Some(Incoming::Request(expected)), &b"XYZ"[..])
    );
}

#[test]
fn oversized_write_is_rejected_and_its_payload_discarded() {
    let mut d = RequestDecoder::new(16);
    let mut b = BytesMut::new();
    header(Command::Write, 20).encode(&mut b);
    b.put_slice(&[0xaa; 12]);
    let first = d.decode(&mut b).unwrap();
    let pending = d.decode(&mut b).unwrap();
    let mut rest = BytesMut::from(&[0xaa; 8][..]);
    header(Command::Flush, 0).encode(&mut rest);

    let second = d.decode(&mut rest).unwrap();

    assert_eq!(first, Some(Incoming::Oversized(header(Command::Write, 20))));
    assert_eq!((pending, b.len()), (None, 0));
    assert!(matches!(second, Some(Incoming::Request(r)) if r.header.command == Command::Flush));
}

fn tinfo() -> TransmissionInfo {
    TransmissionInfo {
        size: 1 << 20,
        flags: transmission_flags::HAS_FLAGS
            | transmission_flags::SEND_FLUSH
            | transmission_flags::SEND_FUA
            | transmission_flags::SEND_TRIM
            | transmission_flags::SEND_WRITE_ZEROES
            | transmission_flags::SEND_FAST_ZERO,
        structured: true,
        base_allocation: Some(1),
        max_payload: MAX_PAYLOAD,
    }
}

#[test]
fn request_past_the_end_is_einval() {
    let h = RequestHeader {
        offset: (1 << 20) - 512,
        ..header(Command::Read, 1024)
    };

    assert_eq!(check_request(&h, &tinfo()), Err(errno::EINVAL));
}

#[test]
fn request_with_overflowing_offset_is_einval() {
    let h = RequestHeader {
        offset: u64::MAX,
        ..header(Command::Trim, 2)
    };

    assert_eq!(check_request(&h, &tinfo()), Err(errno::EINVAL));
}

#[test]
fn write_to_read_only_export_is_eperm() {
    let info = TransmissionInfo {
        flags: transmission_flags::READ_ONLY,
        ..tinfo()
    };

    assert_eq!(
        check_request(&header(Command::WriteZeroes, 512), &info),
        Err(errno::EPERM)
    );
}

#[test]
fn read_over_max_payload_is_eoverflow() {
    let info = TransmissionInfo {
        size: u64::MAX,
        ..tinfo()
    };

    assert_eq!(
        check_request(&header(Command::Read, MAX_PAYLOAD + 1), &info),
        Err(errno::EOVERFLOW)
    );
}

#[test]
fn unknown_command_is_einval() {
    assert_eq!(
        check_request(&header(Command::Unknown(42), 0), &tinfo()),
        Err(errno::EINVAL)
    );
}

#[test]
fn flag_not_valid_for_command_is_einval() {
    let h = RequestHeader {
        flags: cmd_flags::REQ_ONE,
        ..header(Command::Read, 512)
    };

    assert_eq!(check_request(&h, &tinfo()), Err(errno::EINVAL));
}

#[test]
fn block_status_without_meta_context_is_einval() {
    let info = TransmissionInfo {
        base_allocation: None,
        ..tinfo()
    };

    assert_eq!(
        check_request(&header(Command::BlockStatus, 512), &info),
        Err(errno::EINVAL)
    );
}

#[test]
fn valid_fua_write_zeroes_with_no_hole_passes() {
    let h = RequestHeader {
        flags: cmd_flags::FUA | cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
        ..header(Command::WriteZeroes, 8192)
    };

    assert_eq!(check_request(&h, &tinfo()), Ok(()));
}

#[test]
fn simple_reply_header_is_16_bytes() {
    let mut b = BytesMut::new();

    put_simple_reply(&mut b, 9, errno::EIO);

    assert_eq!(&b[..], b"\x67\x44\x66\x98\0\0\0\x05\0\0\0\0\0\0\0\x09");
}

#[test]
fn offset_data_header_counts_the_offset_in_its_length() {
    let mut b = BytesMut::new();

    put_offset_data_header(&mut b, 1, true, 512, 4096);

    let expected: &[u8] =
        b"\x66\x8e\x33\xef\0\x01\0\x01\0\0\0\0\0\0\0\x01\0\0\x10\x08\0\0\0\0\0\0\x02\0";
    assert_eq!(&b[..], expected);
}

#[test]
fn error_chunk_carries_error_and_message() {
    let mut b = BytesMut::new();

    put_error(&mut b, 1, true, errno::EINVAL, "bad");

    assert_eq!(&b[16..], b"\0\0\0\x09\0\0\0\x16\0\x03bad");
}

#[test]
fn simple_read_reply_decodes_with_its_data() {
    let mut t = ClientTransmission::new();
    let mut req = BytesMut::new();
    let cookie = t.encode_request(&mut req, Command::Read, 0, 0, 4);
    let mut b = BytesMut::new();
    put_simple_reply(&mut b, cookie, 0);
    b.put_slice(b"dataNEXT");

    let r = t.decode_reply(&mut b).unwrap();

    assert_eq!(
        r,
        Some(Reply::Simple {
            cookie,
            error: 0,
            data: Bytes::from_static(b"data")
        })
    );
    assert_eq!((&b[..], t.in_flight()), (&b"NEXT"[..], 0));
}

#[test]
fn reply_for_unknown_cookie_is_an_error() {
    let mut b = BytesMut::new();
    put_none(&mut b, 99);

    let r = ClientTransmission::new().decode_reply(&mut b);

    assert_eq!(r, Err(ProtocolError::UnknownCookie(99)));
}

#[test]
fn extents_merge_equal_neighbours_and_stop_after_covering_the_request() {
    let input = [(512, 0), (512, 0), (1024, 3), (4096, 0), (4096, 3)];

    let e = build_extents(1536, false, input);

    assert_eq!(
        e,
        vec![
            BlockExtent {
                length: 1024,
                flags: 0
            },
            BlockExtent {
                length: 1024,
                flags: 3
            }
        ]
    );
}

#[test]
fn extents_with_req_one_are_one_clamped_extent() {
    let e = build_extents(100, true, [(4096, 3), (4096, 0)]);

    assert_eq!(
        e,
        vec![BlockExtent {
            length: 100,
            flags: 3
        }]
    );
}

#[test]
fn empty_extent_list_reports_the_range_as_unknown_data() {
    let e = build_extents(100, false, []);

    assert_eq!(
        e,
        vec![BlockExtent {
            length: 100,
            flags: 0
        }]
    );
}

#[test]
fn huge_extents_are_split_to_fit_32_bits() {
    let e = build_extents(u32::MAX, false, [(u64::from(u32::MAX) * 2, 0)]);

    assert_eq!(e.len(), 2);
    assert_eq!(e[0].length, 0xffff_fe00);
}

// ---- properties ----

fn arb_command() -> impl Strategy<Value = Command> {
    any::<u16>().prop_map(Command::from_u16)
}

prop_compose! {
    fn arb_request()(flags in any::<u16>(), command in arb_command(), cookie in any::<u64>(),
                     offset in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..64),
                     length in 0u32..1_000_000) -> Request {
        let is_write = command == Command::Write;
        let length = if is_write { payload.len() as u32 } else { length };
        let payload = if is_write { Bytes::from(payload) } else { Bytes::new() };
        Request { header: RequestHeader { flags, command, cookie, offset, length }, payload }
    }
}

proptest! {
    #[test]
    fn encoded_requests_decode_back_equal(reqs in proptest::collection::vec(arb_request(), 1..8)) {
        let mut b = BytesMut::new();
        for r in &reqs {
            r.encode(&mut b);
        }
        let mut d = RequestDecoder::new(MAX_PAYLOAD);
        let mut got = Vec::new();
        while let Some(Incoming::Request(r)) = d.decode(&mut b).unwrap() {
            got.push(r);
        }
        prop_assert_eq!(got, reqs);
        prop_assert!(b.is_empty());
    }

    #[test]
    fn request_decoder_never_panics_or_overconsumes(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut b = BytesMut::from(&data[..]);
        let mut d = RequestDecoder::new(64);
        let mut consumed = 0;
        while let Ok(Some(_)) = d.decode(&mut b) {
            prop_assert!(data.len() - b.len() >= consumed);
            consumed = data.len() - b.len();
        }
        prop_assert!(b.len() <= data.len());
    }

    #[test]
    fn server_handshake_never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut s = ServerHandshake::new(exports());
        let mut b = BytesMut::new();
        b.put_u32(client_flags::FIXED_NEWSTYLE);
        b.put_u64(IHAVEOPT);
        b.put_slice(&data);
        let _ = s.handle_input(&mut b);
        prop_assert!(b.len() <= data.len() + 12);
    }

    #[test]
    fn chunks_decode_back_equal(offset in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 1..100),
                                error in 1u32.., msg in "[a-z]{0,20}", hole in 1u32..) {
        let mut t = ClientTransmission::new();
        let mut req = BytesMut::new();
        let cookie = t.encode_request(&mut req, Command::Read, 0, 0, 1);
        let mut b = BytesMut::new();
        put_offset_data_header(&mut b, cookie, false, offset, data.len() as u32);
        b.put_slice(&data);
        put_offset_hole(&mut b, cookie, false, offset, hole);
        put_error_offset(&mut b, cookie, false, error, &msg, offset);
        put_error(&mut b, cookie, true, error, &msg);
        let mut got = Vec::new();
        while let Some(r) = t.decode_reply(&mut b).unwrap() {
            got.push(r);
        }
        let chunk = |done, chunk| Reply::Chunk { cookie, done, chunk };
        prop_assert_eq!(got, vec![
            chunk(false, Chunk::OffsetData { offset, data: Bytes::from(data) }),
            chunk(false, Chunk::OffsetHole { offset, length: hole }),
            chunk(false, Chunk::ErrorOffset { error, message: msg.clone(), offset }),
            chunk(true, Chunk::Error { error, message: msg }),
        ]);
    }
}
