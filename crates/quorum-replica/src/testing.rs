//! Test doubles for engine tests (feature `test-utils`).
//!
//! - [`MemReplica`]: an in-memory replica, sparse in 4 KiB blocks.
//! - [`FaultyReplica`]: wraps any replica and applies a shared, changeable
//!   [`FaultPlan`]: fail an operation with an errno on a range, corrupt read
//!   data on a range, delay, and count calls. Deterministic: rules match by
//!   operation and range overlap, in insertion order.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::raw::{check_range, check_writable};
use crate::{ErrorKind, Extent, Replica, ReplicaError, Result};

const BLOCK: u64 = 4096;

/// An in-memory replica. Unwritten 4 KiB blocks read as zeroes and are
/// reported as holes; `write_zeroes(may_unmap)` and `discard` drop whole
/// blocks (and zero partial ones).
#[derive(Debug)]
pub struct MemReplica {
    size: u64,
    blocks: RwLock<HashMap<u64, Box<[u8]>>>,
    read_only: bool,
}

impl MemReplica {
    /// An all-zero replica of `size` bytes.
    pub fn new(size: u64) -> Self {
        MemReplica {
            size,
            blocks: RwLock::new(HashMap::new()),
            read_only: false,
        }
    }

    /// A replica holding `data` (its size is `data.len()`).
    pub fn with_data(data: &[u8]) -> Self {
        let r = MemReplica::new(data.len() as u64);
        r.write_at(data, 0, false).unwrap();
        r
    }

    /// The same replica, refusing writes with [`ErrorKind::ReadOnly`].
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// A copy of the whole contents.
    pub fn contents(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        self.read_at(&mut v, 0).unwrap();
        v
    }

    fn writable(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        check_writable(self.read_only, self.size, op, offset, len)
    }

    /// Per-block pieces of `[offset, offset + len)`: (block, start in block, length).
    fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
        let mut pos = offset;
        let end = offset + len;
        std::iter::from_fn(move || {
            (pos < end).then(|| {
                let blk = pos / BLOCK;
                let start = (pos % BLOCK) as usize;
                let n = (end - pos).min(BLOCK - start as u64) as usize;
                pos += n as u64;
                (blk, start, n)
            })
        })
    }

    fn zero(&self, offset: u64, len: u64, unmap: bool) {
        let mut blocks = self.blocks.write();
        for (blk, start, n) in Self::pieces(offset, len) {
            if unmap && n as u64 == BLOCK {
                blocks.remove(&blk);
            } else if let Some(b) = blocks.get_mut(&blk) {
                b[start..start + n].fill(0);
            }
        }
    }
}

impl Replica for MemReplica {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, "read", offset, buf.len() as u64)?;
        let blocks = self.blocks.read();
        let mut done = 0;
        for (blk, start, n) in Self::pieces(offset, buf.len() as u64) {
            let dst = &mut buf[done..done + n];
            match blocks.get(&blk) {
                Some(b) => dst.copy_from_slice(&b[start..start + n]),
                None => dst.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        self.writable("write", offset, buf.len() as u64)?;
        let mut blocks = self.blocks.write();
        let mut done = 0;
        for (blk, start, n) in Self::pieces(offset, buf.len() as u64) {
            let b = blocks
                .entry(blk)
                .or_insert_with(|| vec![0u8; BLOCK as usize].into_boxed_slice());
            b[start..start + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, _fua: bool) -> Result<()> {
        self.writable("write_zeroes", offset, len)?;
        self.zero(offset, len, may_unmap);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable("discard", offset, len)?;
        self.zero(offset, len, true);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size, "block_status", offset, len)?;
        let blocks = self.blocks.read();
        let mut out: Vec<Extent> = Vec::new();
        for (blk, _, n) in Self::pieces(offset, len) {
            let hole = !blocks.contains_key(&blk);
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += n as u64,
                _ => out.push(Extent {
                    length: n as u64,
                    zero: hole,
                    hole,
                }),
            }
        }
        Ok(out)
    }
}

/// An operation of the [`Replica`] trait, for matching and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `write_zeroes`.
    WriteZeroes,
    /// `discard`.
    Discard,
    /// `flush`.
    Flush,
    /// `block_status`.
    BlockStatus,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail the call with this errno, without calling the inner replica.
    Fail(i32),
    /// Reads only: XOR the returned bytes inside the rule's range with this
    /// (non-zero) value, after a successful inner read.
    Corrupt(u8),
    /// Sleep this long before calling the inner replica.
    Delay(Duration),
}

/// One rule: `fault` on calls of `op` whose range overlaps `range`
/// (`None` = any range, and always for flush).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Which operation.
    pub op: Op,
    /// Which byte range (overlap); `None` matches every call.
    pub range: Option<Range<u64>>,
    /// What to do.
    pub fault: Fault,
    /// Apply to this many matching calls, then retire (`None` = forever).
    pub times: Option<u32>,
}

#[derive(Debug, Default)]
struct PlanState {
    rules: Vec<Rule>,
    calls: HashMap<Op, u64>,
}

/// The shared, changeable schedule of a [`FaultyReplica`]. Clone it to keep
/// a handle while the replica is owned elsewhere.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan(Arc<Mutex<PlanState>>);

impl FaultPlan {
    /// An empty plan: every call passes through.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a rule.
    pub fn add(&self, rule: Rule) {
        self.0.lock().rules.push(rule);
    }

    /// Fail every `op` overlapping `range` with `errno`.
    pub fn fail(&self, op: Op, range: Range<u64>, errno: i32) {
        self.add(Rule {
            op,
            range: Some(range),
            fault: Fault::Fail(errno),
            times: None,
        });
    }

    /// Corrupt read data inside `range` (XOR with `xor`).
    pub fn corrupt_reads(&self, range: Range<u64>, xor: u8) {
        self.add(Rule {
            op: Op::Read,
            range: Some(range),
            fault: Fault::Corrupt(xor),
            times: None,
        });
    }

    /// Delay every `op` overlapping `range`.
    pub fn delay(&self, op: Op, range: Range<u64>, by: Duration) {
        self.add(Rule {
            op,
            range: Some(range),
            fault: Fault::Delay(by),
            times: None,
        });
    }

    /// Remove every rule (counters stay).
    pub fn clear(&self) {
        self.0.lock().rules.clear();
    }

    /// How many calls of `op` the replica has seen (matching or not).
    pub fn calls(&self, op: Op) -> u64 {
        self.0.lock().calls.get(&op).copied().unwrap_or(0)
    }

    /// Count the call and collect the faults that apply to it.
    fn faults(&self, op: Op, offset: u64, len: u64) -> Vec<(Fault, Option<Range<u64>>)> {
        let mut st = self.0.lock();
        *st.calls.entry(op).or_default() += 1;
        let mut hits = Vec::new();
        for rule in st.rules.iter_mut().filter(|r| r.op == op) {
            let overlaps = match &rule.range {
                None => true,
                Some(r) => op == Op::Flush || (r.start < offset + len.max(1) && offset < r.end),
            };
            if !overlaps || rule.times == Some(0) {
                continue;
            }
            if let Some(t) = rule.times.as_mut() {
                *t -= 1;
            }
            hits.push((rule.fault, rule.range.clone()));
        }
        st.rules.retain(|r| r.times != Some(0));
        hits
    }
}

/// A replica that injects faults from a [`FaultPlan`] into calls to an
/// inner replica. Delays run first, then failures (no inner call), then
/// the inner call, then read corruption.
#[derive(Debug)]
pub struct FaultyReplica {
    inner: Arc<dyn Replica>,
    plan: FaultPlan,
}

impl FaultyReplica {
    /// Wrap `inner` with an empty plan; get the plan with [`Self::plan`].
    pub fn new(inner: impl Into<Arc<dyn Replica>>) -> Self {
        FaultyReplica {
            inner: inner.into(),
            plan: FaultPlan::new(),
        }
    }

    /// Wrap `inner` with a plan shared with the caller.
    pub fn with_plan(inner: impl Into<Arc<dyn Replica>>, plan: FaultPlan) -> Self {
        FaultyReplica {
            inner: inner.into(),
            plan,
        }
    }

    /// A handle on this replica's plan.
    pub fn plan(&self) -> FaultPlan {
        self.plan.clone()
    }

    /// The wrapped replica.
    pub fn inner(&self) -> &Arc<dyn Replica> {
        &self.inner
    }

    /// Apply delays and failures; return the corruptions to apply after.
    fn enter(
        &self,
        op: Op,
        name: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u8, Range<u64>)>> {
        let mut corrupt = Vec::new();
        let faults = self.plan.faults(op, offset, len);
        for (fault, _) in &faults {
            if let Fault::Delay(d) = fault {
                std::thread::sleep(*d);
            }
        }
        for (fault, range) in faults {
            match fault {
                Fault::Fail(errno) => {
                    return Err(ReplicaError::new(
                        ErrorKind::Io(errno),
                        name,
                        format!("injected errno {errno}"),
                    )
                    .at(offset, len));
                }
                Fault::Corrupt(x) => corrupt.push((x, range.unwrap_or(0..u64::MAX))),
                Fault::Delay(_) => {}
            }
        }
        Ok(corrupt)
    }
}

impl Replica for FaultyReplica {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let corrupt = self.enter(Op::Read, "read", offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        for (x, r) in corrupt {
            let (s, e) = (r.start.max(offset), r.end.min(end));
            for b in &mut buf[(s - offset) as usize..(e - offset) as usize] {
                *b ^= x;
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.enter(Op::Write, "write", offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> Result<()> {
        self.enter(Op::WriteZeroes, "write_zeroes", offset, len)?;
        self.inner.write_zeroes(offset, len, may_unmap, fua)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.enter(Op::Discard, "discard", offset, len)?;
        self.inner.discard(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.enter(Op::Flush, "flush", 0, 0)?;
        self.inner.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.enter(Op::BlockStatus, "block_status", offset, len)?;
        self.inner.block_status(offset, len)
    }
}
