//! Request decoding: structured requests must round-trip through any split
//! of the byte stream; arbitrary bytes must never panic, never be
//! over-consumed, and never make the decoder buffer an oversized payload.
#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbd_proto::consts::MAX_PAYLOAD;
use nbd_proto::{
    Command, Incoming, Request, RequestDecoder, RequestHeader, TransmissionInfo, check_request,
};

#[derive(Debug, Arbitrary)]
struct Req {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: Vec<u8>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    requests: Vec<Req>,
    splits: Vec<u16>,
    garbage: Vec<u8>,
    max_payload: u16,
    info_size: u64,
    info_flags: u16,
    structured: bool,
}

fuzz_target!(|input: Input| {
    // 1. Encoded requests decode back equal, whatever the read boundaries.
    let reqs: Vec<Request> = input
        .requests
        .iter()
        .map(|r| {
            let command = Command::from_u16(r.command);
            let write = command == Command::Write;
            let length = if write {
                r.payload.len() as u32
            } else {
                r.length
            };
            let header = RequestHeader {
                flags: r.flags,
                command,
                cookie: r.cookie,
                offset: r.offset,
                length,
            };
            let payload = if write {
                r.payload.clone().into()
            } else {
                Default::default()
            };
            Request { header, payload }
        })
        .collect();
    let mut wire = BytesMut::new();
    for r in &reqs {
        r.encode(&mut wire);
    }
    let mut decoder = RequestDecoder::new(MAX_PAYLOAD);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut splits = input.splits.iter().cycle();
    while !wire.is_empty() {
        let n = (usize::from(*splits.next().unwrap_or(&u16::MAX)) + 1).min(wire.len());
        buf.extend_from_slice(&wire.split_to(n));
        while let Some(i) = decoder.decode(&mut buf).expect("valid stream decodes") {
            match i {
                Incoming::Request(r) => got.push(r),
                Incoming::Oversized(h) => panic!("unexpected oversized {h:?}"),
            }
        }
    }
    assert_eq!(got, reqs);
    assert!(buf.is_empty());

    // 2. Arbitrary bytes: no panic, consumption only shrinks the buffer,
    //    buffered payload never exceeds the limit.
    let max = u32::from(input.max_payload);
    let mut decoder = RequestDecoder::new(max);
    let mut buf = BytesMut::from(&input.garbage[..]);
    loop {
        let before = buf.len();
        match decoder.decode(&mut buf) {
            Ok(Some(Incoming::Request(r))) => {
                assert!(r.payload.len() as u64 <= u64::from(max));
                assert!(buf.len() < before);
            }
            Ok(Some(Incoming::Oversized(h))) => assert!(h.length > max),
            Ok(None) | Err(_) => break,
        }
        // 3. The semantic check never panics on anything that decodes.
    }
    let info = TransmissionInfo {
        size: input.info_size,
        flags: input.info_flags,
        structured: input.structured,
        base_allocation: input.structured.then_some(1),
        max_payload: MAX_PAYLOAD,
    };
    for r in &reqs {
        let verdict = check_request(&r.header, &info);
        if let Ok(()) = verdict {
            if r.header.command != Command::Disc && r.header.command != Command::Flush {
                assert!(r.header.offset + u64::from(r.header.length) <= info.size);
            }
        }
    }
});
