//! The control plane's view of a running disk: per-replica information,
//! disk-wide counters, membership changes (replace, add, remove), the
//! resync rate, and the online scrub job.
//!
//! These are the calls the monitor (`quorum serve --qmp`) and the metrics
//! endpoint make; everything they return is a snapshot.

use super::{Disk, Member};
use crate::membership::ReplicaState;

/// What the control plane shows of one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaInfo {
    /// Node name (`replica-0`, ...).
    pub name: String,
    /// Where it is: a file path or an NBD URI.
    pub uri: String,
    /// Its state.
    pub state: ReplicaState,
    /// Why it is failed (empty otherwise).
    pub reason: String,
    /// Bytes it missed, as the record has them (`None` without tracking).
    pub missed_bytes: Option<u64>,
    /// Resync progress in percent while stale, new or resyncing; `None`
    /// when there is nothing to resync (or no tracking).
    pub resync_progress: Option<u8>,
}

/// Why a control request was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No replica has that name.
    #[error("no replica named '{0}'")]
    NotFound(String),
    /// Refused: doing it would be unsafe, or the disk cannot (read-only,
    /// another scrub is running, ...). The message says why.
    #[error("{0}")]
    Refused(String),
    /// Tried, and failed.
    #[error("{0}")]
    Failed(String),
}

impl Disk {
    /// Each replica, in order, as the control plane shows it.
    pub fn replicas_info(&self) -> Vec<ReplicaInfo> {
        let missed = self.missed_bytes();
        self.slots()
            .iter()
            .enumerate()
            .map(|(i, s)| ReplicaInfo {
                name: s.name.clone(),
                uri: String::new(),
                state: s.state(),
                reason: s.reason(),
                missed_bytes: missed.as_ref().map(|m| m[i]),
                resync_progress: None,
            })
            .collect()
    }

    /// Replace replica `name` by `new` while the disk serves: `new` is
    /// locked and taken in as `new` (every chunk missed, never read or
    /// voted) and rebuilt in the background; the old replica is released.
    pub fn replace_replica(&self, name: &str, new: Member) -> Result<(), ControlError> {
        let _ = new;
        Err(ControlError::Refused(format!(
            "replacing {name}: not implemented yet"
        )))
    }

    /// Add `new` as one more replica, rebuilt in full in the background.
    /// Returns its node name.
    pub fn add_replica(&self, new: Member) -> Result<String, ControlError> {
        let _ = new;
        Err(ControlError::Refused("adding: not implemented yet".into()))
    }

    /// Remove replica `name` (refused if fewer replicas than the threshold
    /// needs would be left).
    pub fn remove_replica(&self, name: &str) -> Result<(), ControlError> {
        Err(ControlError::Refused(format!(
            "removing {name}: not implemented yet"
        )))
    }

    /// Set the resync rate limit, in bytes per second (0: none).
    pub fn set_resync_rate(&self, bytes_per_second: u64) {
        let _ = bytes_per_second;
    }

    /// The resync rate limit, in bytes per second (0: none).
    pub fn resync_rate(&self) -> u64 {
        0
    }
}
