//! Server handshake: any option sequence, fed in any split, never panics;
//! every byte the server emits is a well-formed greeting / option reply /
//! export-name answer; a negotiated result is consistent with the catalogue.
//! And a client configured from the input always agrees with the server.
#![no_main]

use arbitrary::Arbitrary;
use bytes::{Buf, BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use nbd_proto::consts::{BASE_ALLOCATION, IHAVEOPT, OPTION_REPLY_MAGIC, opt};
use nbd_proto::{
    ClientConfig, ClientHandshake, ExportInfo, HandshakeOutcome, ProtocolError, ServerHandshake,
};

#[derive(Debug, Arbitrary)]
enum Opt {
    Raw {
        code: u32,
        data: Vec<u8>,
    },
    Go {
        info: bool,
        name: String,
        requests: Vec<u16>,
    },
    Meta {
        set: bool,
        name: String,
        queries: Vec<String>,
    },
    Structured,
    List,
}

#[derive(Debug, Arbitrary)]
struct Input {
    client_flags: u32,
    options: Vec<Opt>,
    splits: Vec<u8>,
    client_export: String,
    client_structured: bool,
    client_meta: bool,
}

fn exports() -> Vec<ExportInfo> {
    vec![
        ExportInfo {
            name: "vda".into(),
            description: "d".into(),
            size: 1 << 30,
            flags: 0x4d,
        },
        ExportInfo {
            name: "b".into(),
            description: String::new(),
            size: 512,
            flags: 0,
        },
    ]
}

fn put_str32(d: &mut Vec<u8>, s: &str) {
    d.put_u32(s.len() as u32);
    d.put_slice(s.as_bytes());
}

fn encode(o: &Opt, out: &mut BytesMut) {
    let (code, data) = match o {
        Opt::Raw { code, data } => (*code, data.clone()),
        Opt::Go {
            info,
            name,
            requests,
        } => {
            let mut d = Vec::new();
            put_str32(&mut d, name);
            d.put_u16(requests.len() as u16);
            requests.iter().for_each(|r| d.put_u16(*r));
            (if *info { opt::INFO } else { opt::GO }, d)
        }
        Opt::Meta { set, name, queries } => {
            let mut d = Vec::new();
            put_str32(&mut d, name);
            d.put_u32(queries.len() as u32);
            queries.iter().for_each(|q| put_str32(&mut d, q));
            (
                if *set {
                    opt::SET_META_CONTEXT
                } else {
                    opt::LIST_META_CONTEXT
                },
                d,
            )
        }
        Opt::Structured => (opt::STRUCTURED_REPLY, Vec::new()),
        Opt::List => (opt::LIST, Vec::new()),
    };
    out.put_u64(IHAVEOPT);
    out.put_u32(code);
    out.put_u32(data.len() as u32);
    out.put_slice(&data);
}

/// Check the server's option replies are well framed (greeting stripped).
fn check_replies(mut out: &[u8]) {
    while out.len() >= 20 && out[..8] == OPTION_REPLY_MAGIC.to_be_bytes() {
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert!(out.len() >= 20 + len, "reply shorter than its length");
        out.advance(20 + len);
    }
    // What may remain is the EXPORT_NAME answer: 10 or 134 bytes.
    assert!(
        out.is_empty() || out.len() == 10 || out.len() == 134,
        "stray bytes {}",
        out.len()
    );
}

fuzz_target!(|input: Input| {
    let mut server = ServerHandshake::new(exports());
    let greeting = server.poll_transmit().unwrap();
    assert_eq!(greeting.len(), 18);
    let mut wire = BytesMut::new();
    wire.put_u32(input.client_flags);
    for o in &input.options {
        encode(o, &mut wire);
    }
    let total = wire.len();
    let mut buf = BytesMut::new();
    let mut emitted = Vec::new();
    let mut splits = input.splits.iter().cycle();
    let mut outcome = None;
    while !wire.is_empty() && outcome.is_none() {
        let n = (usize::from(*splits.next().unwrap_or(&255)) + 1).min(wire.len());
        buf.extend_from_slice(&wire.split_to(n));
        match server.handle_input(&mut buf) {
            Ok(o) => outcome = o,
            Err(_) => break,
        }
        if let Some(b) = server.poll_transmit() {
            emitted.extend_from_slice(&b);
        }
        assert!(buf.len() + wire.len() <= total);
    }
    check_replies(&emitted);
    if let Some(HandshakeOutcome::Negotiated(n)) = outcome {
        assert!(n.export < 2);
        assert!(n.base_allocation.is_none() || n.structured);
    }

    // Client against server: they agree, or the export is unknown.
    let mut server = ServerHandshake::new(exports());
    let cfg = ClientConfig {
        export: input.client_export.clone(),
        structured: input.client_structured,
        base_allocation: input.client_meta,
    };
    let mut client = ClientHandshake::new(cfg);
    let (mut c_in, mut s_in) = (BytesMut::new(), BytesMut::new());
    for _ in 0..32 {
        if let Some(b) = server.poll_transmit() {
            c_in.extend_from_slice(&b);
        }
        match client.handle_input(&mut c_in) {
            Ok(Some(c)) => {
                assert_eq!(c.structured, input.client_structured);
                let wants_meta = input.client_structured && input.client_meta;
                assert_eq!(c.base_allocation.is_some(), wants_meta);
                return;
            }
            Ok(None) => {}
            Err(ProtocolError::OptionRefused { .. }) => {
                let known = ["", "vda", "b"].contains(&input.client_export.as_str());
                assert!(!known, "known export refused");
                return;
            }
            Err(e) => panic!("client failed: {e}"),
        }
        if let Some(b) = client.poll_transmit() {
            s_in.extend_from_slice(&b);
        }
        if let Err(e) = server.handle_input(&mut s_in) {
            assert!(
                input.client_export.len() > 4096 || matches!(e, ProtocolError::TooLong { .. }),
                "{e}"
            );
            return;
        }
    }
    panic!("client and server did not finish: {}", BASE_ALLOCATION);
});
