//! Pure quorum voting: who is right, decided without I/O.
//!
//! ```text
//!  n copies (bytes or errno) ──vote_read──▶ Verdict::Agreed { blocks: [BlockVote] }
//!  + threshold, granularity              └▶ Verdict::NoQuorum { errno }
//!  n results (ok or errno)  ──vote_status─▶ Ok(()) | Err(errno)
//! ```
//!
//! Rules follow QEMU's quorum driver (see `quorum-semantics.md`) except for
//! granularity: [`Granularity::Block`] votes every block on its own, so a
//! read whose corruption is scattered over different replicas still wins.
//!
//! Tie-break, for content and for errnos alike: among the largest groups,
//! the one first seen at the highest replica index wins. This is what
//! QEMU's driver does, so differential tests agree.
#![warn(missing_docs)]

/// Replica set as a bit mask (bit i = replica i). At most 64 replicas.
pub type Mask = u64;

/// Largest number of replicas a vote takes.
pub const MAX_REPLICAS: usize = 64;

/// What one replica returned for a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy<'a> {
    /// The bytes it read (same length for every replica).
    Data(&'a [u8]),
    /// The read failed with this errno.
    Failed(i32),
}

/// How finely contents are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// One vote for the whole request, as QEMU does.
    Request,
    /// One vote per block of this many bytes, aligned to absolute disk
    /// offsets (a power of two).
    Block(u32),
}

/// The outcome of one block's vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockVote {
    /// Start, relative to the start of the request.
    pub start: usize,
    /// Length in bytes.
    pub len: usize,
    /// A replica whose copy of this block is the winning content.
    pub source: usize,
    /// Replicas that read successfully but disagree with the winner.
    pub dissent: Mask,
}

/// The outcome of a read vote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every block has a winner with at least `threshold` copies.
    Agreed {
        /// Consecutive runs covering the whole request; adjacent blocks with
        /// the same source and dissent are merged.
        blocks: Vec<BlockVote>,
        /// Replicas whose read failed.
        failed: Mask,
    },
    /// The request cannot be served.
    NoQuorum {
        /// The errno to return: the errno vote when too few reads
        /// succeeded, EIO when the copies disagree.
        errno: i32,
        /// Replicas whose read failed.
        failed: Mask,
        /// Blocks without a winner (empty when too few reads succeeded).
        undecided: Vec<(usize, usize)>,
        /// The blocks that do have a winner, as in [`Verdict::Agreed`]
        /// (empty when too few reads succeeded): a scrub reports and
        /// repairs them even though the request as a whole fails.
        decided: Vec<BlockVote>,
    },
}

impl Verdict {
    /// True when some block had dissenting replicas.
    pub fn has_dissent(&self) -> bool {
        matches!(self, Verdict::Agreed { blocks, .. } if blocks.iter().any(|b| b.dissent != 0))
    }
}

/// Errno for "the copies disagree".
pub const EIO: i32 = 5;

/// Vote on `copies` (one per replica, in replica order).
///
/// `start_offset` is the request's absolute disk offset; block boundaries
/// are aligned to it. `threshold` must be in `1..=copies.len()`.
///
/// # Panics
/// If copies disagree on length, there are more than [`MAX_REPLICAS`]
/// copies, or `threshold` is out of range: these are caller bugs.
pub fn vote_read(
    copies: &[Copy<'_>],
    threshold: usize,
    start_offset: u64,
    granularity: Granularity,
) -> Verdict {
    assert!(copies.len() <= MAX_REPLICAS, "too many replicas");
    assert!(
        (1..=copies.len()).contains(&threshold),
        "threshold out of range"
    );
    let mut failed: Mask = 0;
    let mut ok: Vec<(usize, &[u8])> = Vec::with_capacity(copies.len());
    let mut errnos: Vec<(usize, i32)> = Vec::new();
    for (i, c) in copies.iter().enumerate() {
        match *c {
            Copy::Data(d) => ok.push((i, d)),
            Copy::Failed(e) => {
                failed |= 1 << i;
                errnos.push((i, e));
            }
        }
    }
    if ok.len() < threshold {
        let errno = winner_of(errnos.iter().map(|&(i, e)| (i, e))).unwrap_or(EIO);
        return Verdict::NoQuorum {
            errno,
            failed,
            undecided: Vec::new(),
            decided: Vec::new(),
        };
    }
    let len = ok[0].1.len();
    assert!(
        ok.iter().all(|(_, d)| d.len() == len),
        "copies differ in length"
    );

    // Fast path: every successful copy identical.
    let first = ok[0].1;
    if ok[1..].iter().all(|(_, d)| *d == first) {
        let blocks = vec![BlockVote {
            start: 0,
            len,
            source: ok[0].0,
            dissent: 0,
        }];
        return Verdict::Agreed { blocks, failed };
    }

    let mut blocks: Vec<BlockVote> = Vec::new();
    let mut undecided: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    while start < len {
        let end = block_end(start, len, start_offset, granularity);
        match vote_block(&ok, start, end, threshold) {
            Some((source, dissent)) => {
                push_merged(&mut blocks, start, end - start, source, dissent)
            }
            None => match undecided.last_mut() {
                Some((s, l)) if *s + *l == start => *l += end - start,
                _ => undecided.push((start, end - start)),
            },
        }
        start = end;
    }
    if undecided.is_empty() {
        Verdict::Agreed { blocks, failed }
    } else {
        Verdict::NoQuorum {
            errno: EIO,
            failed,
            undecided,
            decided: blocks,
        }
    }
}

/// Copies of `[start, end)` grouped by content, in order of first
/// appearance: (first member, its block, members, count).
fn groups<'a>(
    ok: &[(usize, &'a [u8])],
    start: usize,
    end: usize,
) -> Vec<(usize, &'a [u8], Mask, u32)> {
    let mut groups: Vec<(usize, &[u8], Mask, u32)> = Vec::with_capacity(ok.len());
    for &(i, d) in ok {
        let block = &d[start..end];
        match groups.iter_mut().find(|g| g.1 == block) {
            Some(g) => {
                g.2 |= 1 << i;
                g.3 += 1;
            }
            None => groups.push((i, block, 1 << i, 1)),
        }
    }
    groups
}

/// End (relative) of the block that starts at `start` in a request of
/// `len` bytes at absolute `start_offset`: blocks align to absolute offsets.
fn block_end(start: usize, len: usize, start_offset: u64, granularity: Granularity) -> usize {
    match granularity {
        Granularity::Request => len,
        Granularity::Block(bs) => {
            let bs = u64::from(bs.max(1));
            let abs = start_offset + start as u64;
            let next = (abs / bs + 1) * bs;
            len.min(start + (next - abs) as usize)
        }
    }
}

/// Vote one block: returns the winning source and the dissenting replicas.
fn vote_block(
    ok: &[(usize, &[u8])],
    start: usize,
    end: usize,
    threshold: usize,
) -> Option<(usize, Mask)> {
    let groups = groups(ok, start, end);
    let best = best_group(groups.iter().map(|g| (g.0, g.3)))?;
    let &(first, _, members, count) = groups.iter().find(|g| g.0 == best)?;
    if (count as usize) < threshold {
        return None;
    }
    let all: Mask = ok.iter().fold(0, |m, (i, _)| m | 1 << i);
    Some((first, all & !members))
}

fn push_merged(
    blocks: &mut Vec<BlockVote>,
    start: usize,
    len: usize,
    source: usize,
    dissent: Mask,
) {
    if let Some(last) = blocks.last_mut()
        && last.start + last.len == start
        && last.source == source
        && last.dissent == dissent
    {
        last.len += len;
        return;
    }
    blocks.push(BlockVote {
        start,
        len,
        source,
        dissent,
    });
}

/// Among groups `(first member index, count)`, the largest; ties go to the
/// group whose first member has the highest index.
fn best_group(groups: impl Iterator<Item = (usize, u32)>) -> Option<usize> {
    groups
        .max_by_key(|&(first, count)| (count, first))
        .map(|(first, _)| first)
}

/// The winning errno among `(replica, errno)` failures: the most common,
/// ties to the errno first seen at the highest replica index.
fn winner_of(failures: impl Iterator<Item = (usize, i32)>) -> Option<i32> {
    let mut groups: Vec<(usize, i32, u32)> = Vec::new();
    for (i, e) in failures {
        match groups.iter_mut().find(|g| g.1 == e) {
            Some(g) => g.2 += 1,
            None => groups.push((i, e, 1)),
        }
    }
    let first = best_group(groups.iter().map(|&(i, _, c)| (i, c)))?;
    groups.iter().find(|g| g.0 == first).map(|g| g.1)
}

/// Decide every block of a range that must be made equal on all replicas
/// after a crash, whether or not it has a majority: per block, the largest
/// group of identical copies wins; between groups of equal size the one
/// whose content is not all zeroes wins (an unwritten block loses to
/// data), then the one whose first member has the lowest index. `None`
/// when no copy was read.
///
/// This is for regions with writes that were in flight when the daemon
/// stopped: NBD promises nothing about unacknowledged writes, but the disk
/// must stay readable, so one deterministic copy is chosen.
pub fn vote_reconcile(
    copies: &[Copy<'_>],
    start_offset: u64,
    granularity: Granularity,
) -> Option<Vec<BlockVote>> {
    let ok: Vec<(usize, &[u8])> = copies
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match *c {
            Copy::Data(d) => Some((i, d)),
            Copy::Failed(_) => None,
        })
        .collect();
    let len = ok.first()?.1.len();
    let mut blocks = Vec::new();
    let mut start = 0;
    while start < len {
        let end = block_end(start, len, start_offset, granularity);
        let groups = groups(&ok, start, end);
        let best = groups
            .iter()
            .max_by_key(|g| (g.3, g.1.iter().any(|&b| b != 0), std::cmp::Reverse(g.0)))
            .expect("at least one copy");
        let all: Mask = ok.iter().fold(0, |m, (i, _)| m | 1 << i);
        push_merged(&mut blocks, start, end - start, best.0, all & !best.2);
        start = end;
    }
    Some(blocks)
}

/// Vote on the results of a write, write-zeroes, discard or flush: success
/// when at least `threshold` replicas succeeded, otherwise the errno vote.
pub fn vote_status(results: &[Result<(), i32>], threshold: usize) -> Result<(), i32> {
    let ok = results.iter().filter(|r| r.is_ok()).count();
    if ok >= threshold {
        return Ok(());
    }
    let failures = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.err().map(|e| (i, e)));
    Err(winner_of(failures).unwrap_or(EIO))
}

#[cfg(test)]
mod tests;
