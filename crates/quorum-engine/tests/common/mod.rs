//! Disk-building helpers shared by the engine's integration tests.

#![allow(dead_code)] // each test binary uses a different subset

use quorum_engine::{BuildError, Disk, Options};
use quorum_replica::Replica;

/// A replica as `Disk::new` takes it: its event name and the boxed replica.
pub type Named = (String, Box<dyn Replica>);

/// Pairs `replica` with `name`, boxed as `Disk::new` expects.
pub fn named(name: impl Into<String>, replica: impl Replica + 'static) -> Named {
    (name.into(), Box::new(replica))
}

/// Default options except for the vote `threshold`.
pub fn with_threshold(threshold: usize) -> Options {
    Options {
        threshold,
        ..Options::default()
    }
}

/// Builds a disk over `replicas` with default options and the given `threshold`.
pub fn disk(replicas: Vec<Named>, threshold: usize) -> Result<Disk, BuildError> {
    Disk::new(replicas, with_threshold(threshold))
}
