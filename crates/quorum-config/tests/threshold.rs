//! The warning for a threshold that is not a majority of the replicas.

use std::fmt::Write as _;
use std::path::Path;

use quorum_config::{DiskConfig, parse_str};

/// A valid disk of `n` raw replicas with threshold `t`.
fn disk(t: u32, n: usize) -> DiskConfig {
    let mut xml = format!("<disk type='quorum'><threshold value='{t}'/>");
    for i in 0..n {
        let _ = write!(
            xml,
            "<backingStore type='file'><format type='raw'/><source file='r{i}.raw'/></backingStore>"
        );
    }
    xml.push_str("<target dev='vda'/></disk>");
    parse_str(&xml, "t.xml", Path::new("/i"), None).unwrap()
}

#[test]
fn a_majority_threshold_gets_no_warning() {
    for (t, n) in [
        (1, 1),
        (2, 2),
        (2, 3),
        (3, 3),
        (3, 4),
        (3, 5),
        (4, 5),
        (4, 7),
    ] {
        assert_eq!(disk(t, n).minority_threshold_warning(), None, "{t} of {n}");
    }
}

#[test]
fn a_threshold_of_half_or_less_is_warned_about() {
    for (t, n) in [(1, 2), (1, 3), (2, 4), (2, 5), (3, 6), (3, 7)] {
        assert!(
            disk(t, n).minority_threshold_warning().is_some(),
            "{t} of {n}"
        );
    }
}

#[test]
fn the_warning_gives_the_reason_and_the_fix() {
    assert_eq!(
        disk(2, 5).minority_threshold_warning().unwrap(),
        "threshold 2 is not a majority of 5 replicas: a write counts as done once 2 replicas \
         have it, and the 3 that missed it can then outvote (or tie) it on a later read; use a \
         threshold of at least 3"
    );
}
