//! The quorum engine: one virtual disk over N replicas.
//!
//! ```text
//!   read(off, buf) ──▶ range lock (shared) ──▶ fan out to N replicas ──▶ quorum_vote
//!                                                         │        ├─ winner → buf
//!                                                         │        ├─ REPORT_BAD events
//!                                                         │        └─ rewrite losers (rewrite-corrupted)
//!   write/zero/discard ──▶ range lock (exclusive) ──▶ all replicas ──▶ ≥ T ok, else errno vote
//!   flush ──▶ all replicas in parallel ──▶ ≥ T ok
//! ```
//!
//! Calls are blocking and thread-safe; the NBD server runs them on a
//! blocking pool. Large requests fan out on the engine's own worker threads.
#![warn(missing_docs)]

mod disk;
mod events;
mod heal;
pub mod membership;
mod open;
pub mod pool;
mod range_lock;
pub mod record;

pub use disk::{
    AllocationWalk, BuildError, ControlError, Disk, DiskStats, Divergence, IoError, Member,
    Options, ReadPattern, ReplicaInfo, ScrubProgress, ScrubState, Tracking, merge_status, strerror,
};
pub use events::{Event, LATENCY_BOUNDS_NS, Latency, OpType, ReplicaStats, sectors};
pub use membership::{Reopen, ReplicaState};
pub use open::{
    CHUNK, OpenError, OpenOptions, REGION, identity_of, open, open_member, options_from_config,
};
pub use pool::{AlignedBuf, BufPool};
pub use quorum_replica::FileRegion;
pub use quorum_vote::{Granularity, Mask};
