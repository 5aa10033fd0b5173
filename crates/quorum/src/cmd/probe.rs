//! `quorum validate --probe`: read each replica's image headers (no locks)
//! and compare them with the XML.

use quorum_config::DiskConfig;

/// Problems found in the images of `cfg`, one line each; empty when all is
/// well: missing files, format mismatches, backing chains that differ from
/// the XML, images quorum refuses, and replicas whose sizes disagree.
pub fn probe(cfg: &DiskConfig) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut sizes: Vec<(String, u64)> = Vec::new();
    for (i, replica) in cfg.replicas.iter().enumerate() {
        let found = quorum_replica::probe_chain(replica);
        if found.is_empty()
            && let Ok(info) = quorum_replica::probe(replica)
        {
            sizes.push((replica.display_name(), info.virtual_size));
        }
        problems.extend(found.into_iter().map(|p| format!("replica {i}: {p}")));
    }
    if let Some((first, size)) = sizes.first() {
        for (name, s) in &sizes[1..] {
            if s != size {
                problems.push(format!(
                    "replica sizes disagree: {first} is {size} bytes, {name} is {s} bytes"
                ));
            }
        }
    }
    Ok(problems)
}
