//! The XML parser + validator on arbitrary input: it must never panic, and any
//! document it accepts must round-trip through canonical XML unchanged.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = Path::new("/fuzz");
    let Ok(cfg) = quorum_config::parse_str(text, "fuzz.xml", base, None) else {
        return;
    };
    let xml = quorum_config::to_xml(&cfg);
    let back = quorum_config::parse_str(&xml, "canonical.xml", base, None)
        .unwrap_or_else(|e| panic!("canonical output refused:\n{e}\n{xml}"));
    assert_eq!(back, cfg, "round trip changed the model:\n{xml}");
    assert_eq!(
        quorum_config::to_xml(&back),
        xml,
        "to_xml is not idempotent"
    );
    let args = quorum_config::qemu::blockdev_args(&cfg);
    assert_eq!(
        args.last().map(|a| a["driver"].as_str()),
        Some(Some("quorum"))
    );
    let _ = quorum_config::qemu::nested_json(&cfg);
});
