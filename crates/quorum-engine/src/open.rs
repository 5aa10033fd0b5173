//! Opening a disk from its validated configuration.

use quorum_config::DiskConfig;
use quorum_vote::Granularity;

use crate::disk::{BuildError, Disk, Options};

/// How to open a disk's replicas.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open every replica read-only (shared locks only), whatever the XML says.
    pub read_only: bool,
    /// Vote on whole requests, as QEMU does, instead of per 4 KiB block.
    pub whole_request_vote: bool,
    /// Take no image locks (QEMU's `locking=off`); benchmarks only.
    pub no_locking: bool,
}

/// A disk that could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A replica could not be opened.
    #[error("cannot open replica {index}: {source}")]
    Replica {
        /// Replica index in the XML.
        index: usize,
        /// Its path or address.
        name: String,
        /// Why.
        #[source]
        source: quorum_replica::OpenError,
    },
    /// The replicas do not form a valid quorum.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Engine options for a configuration.
pub fn options_from_config(cfg: &DiskConfig, opts: &OpenOptions) -> Options {
    Options {
        threshold: cfg.threshold as usize,
        read_pattern: cfg.driver.read_pattern,
        rewrite_corrupted: cfg.driver.rewrite_corrupted,
        blkverify: cfg.driver.blkverify,
        read_only: cfg.readonly || opts.read_only,
        granularity: if opts.whole_request_vote {
            Granularity::Request
        } else {
            Granularity::Block(4096)
        },
        id: cfg.target.dev.clone(),
    }
}

/// Open every replica of `cfg` and assemble the disk. Replica `i` is named
/// `replica-i` in events.
pub fn open(cfg: &DiskConfig, opts: &OpenOptions) -> Result<Disk, OpenError> {
    let options = options_from_config(cfg, opts);
    let ropts = quorum_replica::OpenOptions {
        read_only: options.read_only,
        no_locking: opts.no_locking,
        ..Default::default()
    };
    let mut replicas: Vec<(String, Box<dyn quorum_replica::Replica>)> =
        Vec::with_capacity(cfg.replicas.len());
    for (index, src) in cfg.replicas.iter().enumerate() {
        let r = quorum_replica::open(src, &ropts).map_err(|source| OpenError::Replica {
            index,
            name: src.display_name(),
            source,
        })?;
        let first_size = replicas.first().map(|(_, first)| first.size());
        if let Some(first_size) = first_size
            && r.size() != first_size
        {
            return Err(BuildError::SizeMismatch {
                name: src.display_name(),
                size: r.size(),
                first_name: cfg.replicas[0].display_name(),
                first_size,
            }
            .into());
        }
        replicas.push((format!("replica-{index}"), r));
    }
    Ok(Disk::new(replicas, options)?)
}
