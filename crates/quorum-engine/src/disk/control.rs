//! The control plane's view of a running disk: per-replica information,
//! disk-wide counters, membership changes (replace, add, remove), the
//! resync rate, and the online scrub job.
//!
//! These are the calls the monitor (`quorum serve --qmp`) and the metrics
//! endpoint make; everything they return is a snapshot.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Disk, Member};
use crate::events::Event;
use crate::heal::Heal;
use crate::membership::{ReplicaState, VACANT_NAME};
use quorum_replica::Replica;

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
    /// Each replica, in order, as the control plane shows it (a removed
    /// replica is not listed).
    pub fn replicas_info(&self) -> Vec<ReplicaInfo> {
        let heal = self.members.heal.as_ref();
        let chunk = heal.map_or(0, |h| h.record.header().chunk);
        self.slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_present())
            .map(|(i, s)| {
                let state = s.state();
                let lagging = matches!(
                    state,
                    ReplicaState::Stale | ReplicaState::New | ReplicaState::Resyncing
                );
                ReplicaInfo {
                    name: s.name.clone(),
                    uri: s.uri(),
                    state,
                    reason: s.reason(),
                    missed_bytes: heal.map(|h| h.record.missed_count(i) * chunk),
                    resync_progress: heal.filter(|_| lagging).and_then(|h| h.progress(i)),
                }
            })
            .collect()
    }

    /// Replace replica `name` by `new` while the disk serves: `new` is
    /// locked and taken in as `new` (every chunk missed, never read or
    /// voted) and rebuilt in the background; the old replica is released.
    ///
    /// Refused when the others hold fewer than `threshold` in-sync
    /// replicas, when `new` has another size, and without a record. The
    /// record says `new` (synced) before the replicas are swapped, under a
    /// quiesce of the disk; the node name stays, the URI is `new`'s.
    pub fn replace_replica(&self, name: &str, new: Member) -> Result<(), ControlError> {
        let what = format!("replacing {name}");
        let _control = self.members.control.lock();
        self.check_open(&what)?;
        let i = self.find(name)?;
        let h = self.tracking(&what)?;
        self.check_not_a_member(&what, h, new.identity, Some(i))?;
        let replica = self.take_replica(&what, new.replica)?;
        self.check_in_sync_others(&what, Some(i))?;
        if let Err(e) = h.record_new(i, new.identity) {
            // Some bits may be set: the replica in place stops voting there.
            self.members.note_missed(i);
            return Err(ControlError::Failed(format!(
                "{what}: cannot write the record: {e}"
            )));
        }
        let slot = &self.slots()[i];
        let (old_state, old) = {
            let _all = self.members.ranges.lock_all();
            let old_state = slot.state_name();
            let old = slot.install(replica, new.uri.clone(), ReplicaState::New as u8);
            (old_state, old)
        };
        // Closed now, unless a request still holds it (then when it ends).
        drop(old);
        self.members.events.emit(Event::ReplicaState {
            node_name: slot.name.clone(),
            old: old_state.into(),
            new: ReplicaState::New.to_string(),
            reason: format!("replaced by {}", new.uri),
        });
        self.members.poke();
        Ok(())
    }

    /// Add `new` as one more replica, rebuilt in full in the background.
    /// Returns its node name: the first empty slot's (`replica-K`, K the
    /// smallest index no replica uses, on a disk opened from its
    /// configuration). Past the last slot the disk grows, up to
    /// [`quorum_vote::MAX_REPLICAS`]. `new.name` is not used.
    pub fn add_replica(&self, new: Member) -> Result<String, ControlError> {
        let what = "adding a replica";
        let _control = self.members.control.lock();
        self.check_open(what)?;
        let h = self.tracking(what)?;
        if self.opts.blkverify {
            return Err(ControlError::Refused(format!(
                "{what}: a blkverify disk has exactly 2 replicas"
            )));
        }
        self.check_not_a_member(what, h, new.identity, None)?;
        let replica = self.take_replica(what, new.replica)?;
        let span = self.slots().len();
        let i = self
            .slots()
            .iter()
            .position(|s| !s.is_present())
            .unwrap_or(span);
        if i >= self.members.all_slots().len() {
            return Err(ControlError::Refused(format!(
                "{what}: the disk has {span} replicas, the most a quorum can have"
            )));
        }
        let recorded = if i < span {
            h.record_new(i, new.identity)
        } else if h.record.replica_count() != span {
            return Err(ControlError::Failed(format!(
                "{what}: the record lists {} replicas, the disk {span}",
                h.record.replica_count()
            )));
        } else {
            h.record_added(new.identity).map(drop)
        };
        recorded
            .map_err(|e| ControlError::Failed(format!("{what}: cannot write the record: {e}")))?;
        let slot = &self.members.all_slots()[i];
        {
            let _all = self.members.ranges.lock_all();
            drop(slot.install(replica, new.uri.clone(), ReplicaState::New as u8));
            if i == span {
                self.members.extend_span(i);
            }
        }
        self.members.events.emit(Event::ReplicaState {
            node_name: slot.name.clone(),
            old: VACANT_NAME.into(),
            new: ReplicaState::New.to_string(),
            reason: format!("added: {}", new.uri),
        });
        self.members.poke();
        Ok(slot.name.clone())
    }

    /// Remove replica `name`: it is no longer asked, votes nowhere, is not
    /// retried, and is released. Refused if fewer replicas than the
    /// threshold needs would be left, or fewer in-sync ones. The record
    /// marks it removed (every chunk missed) first, so the same replica
    /// coming back later is rebuilt in full.
    pub fn remove_replica(&self, name: &str) -> Result<(), ControlError> {
        let what = format!("removing {name}");
        let _control = self.members.control.lock();
        self.check_open(&what)?;
        let i = self.find(name)?;
        if self.opts.blkverify {
            return Err(ControlError::Refused(format!(
                "{what}: a blkverify disk has exactly 2 replicas"
            )));
        }
        let left = self.replica_count() - 1;
        let t = self.opts.threshold;
        if left < t {
            return Err(ControlError::Refused(format!(
                "{what} would leave {left} replica(s), but threshold {t} needs {t}"
            )));
        }
        self.check_in_sync_others(&what, Some(i))?;
        if let Some(h) = self.members.heal.as_ref().filter(|h| h.is_active())
            && let Err(e) = h.record_removed(i)
        {
            self.members.note_missed(i);
            return Err(ControlError::Failed(format!(
                "{what}: cannot write the record: {e}"
            )));
        }
        let slot = &self.slots()[i];
        let (old_state, old) = {
            let _all = self.members.ranges.lock_all();
            (slot.state_name(), slot.vacate(self.size))
        };
        drop(old);
        self.members.events.emit(Event::ReplicaState {
            node_name: slot.name.clone(),
            old: old_state.into(),
            new: VACANT_NAME.into(),
            reason: "removed from the disk".into(),
        });
        Ok(())
    }

    /// Set the resync rate limit, in bytes per second (0: none). Takes
    /// effect at once, also on a resync waiting out its throttle.
    pub fn set_resync_rate(&self, bytes_per_second: u64) {
        if let Some(h) = &self.members.heal {
            h.set_rate(bytes_per_second);
            self.members.poke();
        }
    }

    /// The resync rate limit, in bytes per second (0: none).
    pub fn resync_rate(&self) -> u64 {
        self.members.heal.as_ref().map_or(0, |h| h.rate())
    }

    /// The slot of the replica named `name`.
    fn find(&self, name: &str) -> Result<usize, ControlError> {
        self.slots()
            .iter()
            .position(|s| s.is_present() && s.name == name)
            .ok_or_else(|| ControlError::NotFound(name.to_owned()))
    }

    /// Refuse a new replica that is one of the disk's replicas already
    /// (same file under another path, or the same export): it would vote
    /// twice. `except` is the slot it replaces.
    fn check_not_a_member(
        &self,
        what: &str,
        h: &Heal,
        identity: u64,
        except: Option<usize>,
    ) -> Result<(), ControlError> {
        if identity == 0 {
            return Ok(());
        }
        let header = h.record.header();
        for (j, s) in self.slots().iter().enumerate() {
            if Some(j) != except
                && s.is_present()
                && header
                    .replicas
                    .get(j)
                    .is_some_and(|e| e.identity == identity)
            {
                return Err(ControlError::Refused(format!(
                    "{what}: the new replica is {} already ({}); one image cannot hold two copies",
                    s.name,
                    s.uri()
                )));
            }
        }
        Ok(())
    }

    fn check_open(&self, what: &str) -> Result<(), ControlError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(ControlError::Refused(format!("{what}: the disk is closed")));
        }
        Ok(())
    }

    /// The disk's tracking, which a replica rebuilt in full needs.
    fn tracking(&self, what: &str) -> Result<&Heal, ControlError> {
        if self.opts.read_only {
            return Err(ControlError::Refused(format!(
                "{what}: the disk is read-only"
            )));
        }
        match &self.members.heal {
            Some(h) if h.is_active() => Ok(h),
            _ => Err(ControlError::Refused(format!(
                "{what} needs the disk's record (to rebuild the new replica in full); it was started with --no-tracking"
            ))),
        }
    }

    /// The replica of a member to take in, of the disk's size.
    fn take_replica(
        &self,
        what: &str,
        replica: Result<Box<dyn Replica>, String>,
    ) -> Result<Arc<dyn Replica>, ControlError> {
        let r = replica.map_err(|why| {
            ControlError::Refused(format!("{what}: the new replica is not open: {why}"))
        })?;
        if r.size() != self.size {
            return Err(ControlError::Refused(format!(
                "{what}: the new replica has {} bytes, but the disk has {} bytes; it must have the disk's size",
                r.size(),
                self.size
            )));
        }
        Ok(Arc::from(r))
    }

    /// Refuse unless the replicas other than `except` hold at least
    /// `threshold` in-sync ones.
    fn check_in_sync_others(&self, what: &str, except: Option<usize>) -> Result<(), ControlError> {
        let others: Vec<&crate::membership::Slot> = self
            .slots()
            .iter()
            .enumerate()
            .filter(|&(j, s)| Some(j) != except && s.is_present())
            .map(|(_, s)| s)
            .collect();
        let in_sync = others
            .iter()
            .filter(|s| s.state() == ReplicaState::InSync)
            .count();
        let t = self.opts.threshold;
        if in_sync >= t {
            return Ok(());
        }
        let states = others
            .iter()
            .map(|s| format!("{}: {}", s.name, s.state_name()))
            .collect::<Vec<_>>()
            .join(", ");
        Err(ControlError::Refused(format!(
            "{what} would leave {in_sync} in-sync replica(s) among the others ({states}), but threshold {t} needs {t}; wait until they are in sync"
        )))
    }
}
