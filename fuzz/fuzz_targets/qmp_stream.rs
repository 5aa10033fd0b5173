//! The monitor's input: arbitrary bytes, split at arbitrary read
//! boundaries, through the QMP framer and the request parser. The frames
//! must not depend on where reads ended, a text never exceeds the bounds,
//! the framer never holds more than one message, a complete object is
//! never cut short, and nothing panics.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use qmp_proto::{Frame, Framer, MAX_MESSAGE, parse_request};

#[derive(Debug, Arbitrary)]
struct Input {
    bytes: Vec<u8>,
    splits: Vec<u16>,
    /// Well-formed commands mixed into the stream.
    commands: Vec<(String, Option<u32>)>,
}

fn frames(chunks: &[&[u8]]) -> Vec<Frame> {
    let mut f = Framer::new();
    let mut out = Vec::new();
    for c in chunks {
        f.feed(c, &mut out);
    }
    out
}

fuzz_target!(|input: Input| {
    let mut stream = input.bytes.clone();
    for (name, id) in &input.commands {
        let mut cmd = serde_json::json!({"execute": name});
        if let Some(id) = id {
            cmd["id"] = (*id).into();
        }
        stream.extend_from_slice(cmd.to_string().as_bytes());
    }
    // One read, and the same bytes cut where the input says.
    let whole = frames(&[&stream]);
    let mut chunks = Vec::new();
    let mut rest = &stream[..];
    for s in &input.splits {
        if rest.is_empty() {
            break;
        }
        let n = (*s as usize % rest.len()).max(1);
        chunks.push(&rest[..n]);
        rest = &rest[n..];
    }
    chunks.push(rest);
    let split = frames(&chunks);
    assert_eq!(whole, split, "frames depend on read boundaries");

    for f in &whole {
        match f {
            Frame::Text(t) => {
                assert!(t.len() <= MAX_MESSAGE, "a text over the bound");
                // Never panics; a request that parses echoes its id.
                let _ = parse_request(t);
            }
            Frame::Garbage(g) => assert!(!g.is_empty()),
            Frame::TooLarge(_) => {}
        }
    }
    // The commands appended after clean input come out whole and parse.
    if input.bytes.is_empty() && !input.commands.is_empty() {
        let parsed: Vec<_> = whole
            .iter()
            .filter_map(|f| match f {
                Frame::Text(t) => parse_request(t).ok(),
                _ => None,
            })
            .collect();
        assert_eq!(parsed.len(), input.commands.len());
        for (r, (name, id)) in parsed.iter().zip(&input.commands) {
            assert_eq!(&r.execute, name);
            assert_eq!(r.id, id.map(serde_json::Value::from));
        }
    }
});
