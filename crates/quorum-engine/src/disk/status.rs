//! Block status: every replica's extents, merged so that a range is zero
//! (or a hole) only where every replica says so.

use quorum_replica::Extent;

use super::{Disk, IoError};

impl Disk {
    /// Block status: zero (and hole) only where every replica says so.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, IoError> {
        self.check_range("block_status", offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let stale = self.members.stale_mask(offset, len);
        let out = self.fan_out("block_status", false, stale, |_, r| {
            r.block_status(offset, len)
        });
        // Replicas the request went without have no say.
        let lists: Vec<Vec<Extent>> = out
            .results
            .into_iter()
            .enumerate()
            .filter(|(i, _)| out.skipped & (1 << i) == 0)
            .map(|(_, r)| {
                r.unwrap_or_else(|_| {
                    vec![Extent {
                        length: len,
                        zero: false,
                        hole: false,
                    }]
                })
            })
            .collect();
        Ok(merge_status(&lists))
    }
}

/// Intersect per-replica extents: zero/hole only where every list says so.
/// Stops where the shortest list ends.
pub fn merge_status(lists: &[Vec<Extent>]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut idx = vec![0usize; lists.len()];
    let mut used = vec![0u64; lists.len()];
    loop {
        let mut step = u64::MAX;
        let (mut zero, mut hole) = (true, true);
        for (k, list) in lists.iter().enumerate() {
            let Some(e) = list.get(idx[k]) else {
                return out;
            };
            step = step.min(e.length - used[k]);
            zero &= e.zero;
            hole &= e.hole;
        }
        if step == 0 || step == u64::MAX {
            return out;
        }
        match out.last_mut() {
            Some(l) if l.zero == zero && l.hole == hole => l.length += step,
            _ => out.push(Extent {
                length: step,
                zero,
                hole,
            }),
        }
        for (k, list) in lists.iter().enumerate() {
            used[k] += step;
            if used[k] == list[idx[k]].length {
                idx[k] += 1;
                used[k] = 0;
            }
        }
    }
}
