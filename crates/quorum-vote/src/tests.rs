use proptest::prelude::*;

use super::*;

const B: Granularity = Granularity::Block(4096);

fn data(v: &[Vec<u8>]) -> Vec<Copy<'_>> {
    v.iter().map(|d| Copy::Data(d)).collect()
}

fn agreed(v: &Verdict) -> &[BlockVote] {
    match v {
        Verdict::Agreed { blocks, .. } => blocks,
        other => panic!("expected agreement, got {other:?}"),
    }
}

#[test]
fn unanimous_copies_give_one_block_without_dissent() {
    let bufs = vec![vec![7u8; 8192]; 3];
    let v = vote_read(&data(&bufs), 2, 0, B);
    assert_eq!(
        agreed(&v),
        &[BlockVote {
            start: 0,
            len: 8192,
            source: 0,
            dissent: 0
        }]
    );
}

#[test]
fn two_of_three_returns_majority_and_names_the_loser() {
    let bufs = vec![vec![1u8; 4096], vec![2u8; 4096], vec![1u8; 4096]];
    let v = vote_read(&data(&bufs), 2, 0, B);
    assert_eq!(
        agreed(&v),
        &[BlockVote {
            start: 0,
            len: 4096,
            source: 0,
            dissent: 0b010
        }]
    );
}

#[test]
fn three_versions_at_threshold_two_is_eio() {
    let bufs = vec![vec![1u8; 4096], vec![2u8; 4096], vec![3u8; 4096]];
    let v = vote_read(&data(&bufs), 2, 0, B);
    assert_eq!(
        v,
        Verdict::NoQuorum {
            errno: EIO,
            failed: 0,
            undecided: vec![(0, 4096)],
            decided: vec![]
        }
    );
}

#[test]
fn scattered_corruption_wins_per_block_but_fails_per_request() {
    let good = vec![0x5au8; 1 << 20];
    let mut r1 = good.clone();
    r1[..4096].fill(1);
    let mut r2 = good.clone();
    r2[512 << 10..(512 << 10) + 4096].fill(2);
    let bufs = vec![r1, r2, good];
    assert!(matches!(
        vote_read(&data(&bufs), 2, 0, B),
        Verdict::Agreed { .. }
    ));
    assert!(matches!(
        vote_read(&data(&bufs), 2, 0, Granularity::Request),
        Verdict::NoQuorum { errno: EIO, .. }
    ));
}

#[test]
fn no_quorum_still_names_the_decided_blocks_and_their_dissenters() {
    // Block 0: three versions (undecided). Block 1: replica 1 outvoted.
    let mut r0 = vec![7u8; 8192];
    let mut r1 = vec![7u8; 8192];
    let mut r2 = vec![7u8; 8192];
    r0[..4096].fill(1);
    r1[..4096].fill(2);
    r2[..4096].fill(3);
    r1[4096..].fill(9);
    let v = vote_read(&data(&[r0, r1, r2]), 2, 0, B);
    assert_eq!(
        v,
        Verdict::NoQuorum {
            errno: EIO,
            failed: 0,
            undecided: vec![(0, 4096)],
            decided: vec![BlockVote {
                start: 4096,
                len: 4096,
                source: 0,
                dissent: 0b010
            }]
        }
    );
}

#[test]
fn tie_goes_to_highest_numbered_replica() {
    let bufs = vec![vec![0xaau8; 4096], vec![0xbbu8; 4096], vec![0xccu8; 4096]];
    let v = vote_read(&data(&bufs), 1, 0, B);
    assert_eq!(agreed(&v)[0].source, 2);
}

#[test]
fn tie_between_pairs_goes_to_group_first_seen_latest() {
    // {0,3} vs {1,2}: QEMU picks the version created last, i.e. replica 1's.
    let bufs = vec![
        vec![1u8; 512],
        vec![2u8; 512],
        vec![2u8; 512],
        vec![1u8; 512],
    ];
    let v = vote_read(&data(&bufs), 1, 0, B);
    assert_eq!(agreed(&v)[0].source, 1);
}

#[test]
fn blocks_align_to_absolute_offsets() {
    let mut bad = vec![9u8; 8192];
    bad[4000..4100].fill(0);
    let bufs = vec![vec![9u8; 8192], bad, vec![9u8; 8192]];
    // Request starts at disk offset 1000: block edges at 3096 and 7192 in the buffer.
    let v = vote_read(&data(&bufs), 2, 1000, B);
    let dissent: Vec<_> = agreed(&v)
        .iter()
        .map(|b| (b.start, b.len, b.dissent))
        .collect();
    assert_eq!(
        dissent,
        vec![(0, 3096, 0), (3096, 4096, 0b10), (7192, 1000, 0)]
    );
}

#[test]
fn failed_reads_below_threshold_vote_on_errno() {
    let copies = [Copy::Failed(28), Copy::Failed(5), Copy::Failed(28)];
    let v = vote_read(&copies, 1, 0, B);
    assert_eq!(
        v,
        Verdict::NoQuorum {
            errno: 28,
            failed: 0b111,
            undecided: vec![],
            decided: vec![]
        }
    );
}

#[test]
fn errno_tie_goes_to_highest_numbered_replica() {
    let good = vec![0u8; 512];
    let copies = [Copy::Failed(28), Copy::Failed(5), Copy::Data(&good)];
    let v = vote_read(&copies, 3, 0, B);
    assert!(matches!(v, Verdict::NoQuorum { errno: 5, .. }));
}

#[test]
fn one_failed_read_still_wins_with_two_agreeing() {
    let good = vec![3u8; 512];
    let copies = [Copy::Failed(5), Copy::Data(&good), Copy::Data(&good)];
    let v = vote_read(&copies, 2, 0, B);
    assert_eq!(
        v,
        Verdict::Agreed {
            blocks: vec![BlockVote {
                start: 0,
                len: 512,
                source: 1,
                dissent: 0
            }],
            failed: 0b1
        }
    );
}

#[test]
fn two_successful_disagreeing_reads_at_threshold_two_fail() {
    let a = vec![1u8; 512];
    let b = vec![2u8; 512];
    let copies = [Copy::Failed(5), Copy::Data(&a), Copy::Data(&b)];
    assert!(matches!(
        vote_read(&copies, 2, 0, B),
        Verdict::NoQuorum { errno: EIO, .. }
    ));
}

#[test]
fn status_vote_succeeds_at_threshold() {
    assert_eq!(vote_status(&[Err(5), Ok(()), Ok(())], 2), Ok(()));
}

#[test]
fn status_vote_below_threshold_returns_majority_errno() {
    assert_eq!(vote_status(&[Err(28), Err(28), Err(5)], 1), Err(28));
}

#[test]
fn status_vote_errno_tie_goes_to_highest_numbered_replica() {
    assert_eq!(vote_status(&[Err(28), Err(5), Ok(())], 3), Err(5));
}

/// Up to 5 replicas of up to 4 blocks of 64 bytes, each block drawn from a
/// small alphabet of contents so that agreement and ties are common.
fn arb_copies() -> impl Strategy<Value = (Vec<Option<Vec<u8>>>, usize)> {
    (1usize..=5, 1usize..=4).prop_flat_map(|(n, nblocks)| {
        let copy = prop_oneof![
            1 => Just(None),
            6 => proptest::collection::vec(0u8..3, nblocks)
                .prop_map(|b| Some(b.into_iter().flat_map(|v| vec![v; 64]).collect())),
        ];
        (proptest::collection::vec(copy, n), 1..=n)
    })
}

fn as_copies(v: &[Option<Vec<u8>>]) -> Vec<Copy<'_>> {
    v.iter()
        .map(|c| c.as_deref().map_or(Copy::Failed(5), Copy::Data))
        .collect()
}

const G64: Granularity = Granularity::Block(64);

proptest! {
    #[test]
    fn winner_has_at_least_threshold_agreeing_copies((v, t) in arb_copies()) {
        if let Verdict::Agreed { blocks, .. } = vote_read(&as_copies(&v), t, 0, G64) {
            for b in blocks {
                let win = &v[b.source].as_ref().unwrap()[b.start..b.start + b.len];
                let agree = v.iter().flatten().filter(|d| &d[b.start..b.start + b.len] == win).count();
                prop_assert!(agree >= t);
            }
        }
    }

    #[test]
    fn outcome_does_not_depend_on_replica_order((v, t) in arb_copies()) {
        let mut rev = v.clone();
        rev.reverse();
        let a = vote_read(&as_copies(&v), t, 0, G64);
        let b = vote_read(&as_copies(&rev), t, 0, G64);
        // Success and the winning bytes agree; only tie-breaks may differ.
        prop_assume!(!has_tie(&v));
        prop_assert_eq!(winning_bytes(&v, &a), winning_bytes(&rev, &b));
    }

    #[test]
    fn raising_threshold_never_turns_failure_into_success((v, t) in arb_copies()) {
        let lower = vote_read(&as_copies(&v), t, 0, G64);
        for higher in t..=v.len() {
            let r = vote_read(&as_copies(&v), higher, 0, G64);
            let ok = matches!(lower, Verdict::Agreed { .. }) || matches!(r, Verdict::NoQuorum { .. });
            prop_assert!(ok, "threshold {} failed but {} succeeded", t, higher);
        }
    }

    #[test]
    fn unanimity_gives_no_dissent(block in proptest::collection::vec(any::<u8>(), 1..300), n in 1usize..6) {
        let bufs = vec![block; n];
        let v = vote_read(&data(&bufs), n, 0, G64);
        prop_assert!(!v.has_dissent());
        prop_assert!(matches!(v, Verdict::Agreed { .. }), "unanimous copies must agree");
    }

    #[test]
    fn fewer_than_threshold_successes_never_win((v, _t) in arb_copies()) {
        let ok = v.iter().flatten().count();
        for t in ok + 1..=v.len() {
            prop_assert!(
                matches!(vote_read(&as_copies(&v), t, 0, G64), Verdict::NoQuorum { .. }),
                "{} successful copies won at threshold {}", ok, t
            );
        }
    }

    #[test]
    fn blocks_cover_the_request_exactly((v, t) in arb_copies()) {
        if let Verdict::Agreed { blocks, .. } = vote_read(&as_copies(&v), t, 0, G64) {
            let len = v.iter().flatten().next().unwrap().len();
            let mut at = 0;
            for b in &blocks { prop_assert_eq!(b.start, at); at += b.len; }
            prop_assert_eq!(at, len);
        }
    }
}

fn winning_bytes(v: &[Option<Vec<u8>>], verdict: &Verdict) -> Option<Vec<u8>> {
    match verdict {
        Verdict::Agreed { blocks, .. } => Some(
            blocks
                .iter()
                .flat_map(|b| v[b.source].as_ref().unwrap()[b.start..b.start + b.len].to_vec())
                .collect(),
        ),
        Verdict::NoQuorum { .. } => None,
    }
}

/// True when some block has two largest groups of equal size (a tie-break decides).
fn has_tie(v: &[Option<Vec<u8>>]) -> bool {
    let Some(len) = v.iter().flatten().next().map(Vec::len) else {
        return false;
    };
    (0..len / 64).any(|b| {
        let mut counts: Vec<(Vec<u8>, usize)> = Vec::new();
        for d in v.iter().flatten() {
            let blk = d[b * 64..(b + 1) * 64].to_vec();
            match counts.iter_mut().find(|c| c.0 == blk) {
                Some(c) => c.1 += 1,
                None => counts.push((blk, 1)),
            }
        }
        let max = counts.iter().map(|c| c.1).max().unwrap_or(0);
        counts.iter().filter(|c| c.1 == max).count() > 1
    })
}

#[test]
fn reconcile_takes_the_majority_where_there_is_one() {
    let bufs = vec![vec![1u8; 4096], vec![2u8; 4096], vec![2u8; 4096]];
    let b = vote_reconcile(&data(&bufs), 0, B).unwrap();
    assert_eq!((b[0].source, b[0].dissent), (1, 0b001));
}

#[test]
fn reconcile_breaks_a_tie_towards_data_then_the_lowest_index() {
    let two = vec![vec![0u8; 4096], vec![9u8; 4096]];
    let three = vec![vec![3u8; 4096], vec![4u8; 4096], vec![5u8; 4096]];
    let a = vote_reconcile(&data(&two), 0, B).unwrap();
    let b = vote_reconcile(&data(&three), 0, B).unwrap();
    assert_eq!(
        ((a[0].source, a[0].dissent), (b[0].source, b[0].dissent)),
        ((1, 0b01), (0, 0b110))
    );
}

#[test]
fn reconcile_decides_each_block_and_skips_failed_copies() {
    let mut r0 = vec![1u8; 8192];
    r0[4096..].fill(7);
    let r2 = vec![1u8; 8192];
    let copies = [Copy::Data(&r0), Copy::Failed(5), Copy::Data(&r2)];
    let b = vote_reconcile(&copies, 0, B).unwrap();
    assert_eq!(
        b.iter()
            .map(|b| (b.start, b.source, b.dissent))
            .collect::<Vec<_>>(),
        vec![(0, 0, 0), (4096, 0, 0b100)]
    );
    assert_eq!(vote_reconcile(&[Copy::Failed(5)], 0, B), None);
}
