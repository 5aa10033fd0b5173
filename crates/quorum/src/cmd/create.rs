//! `quorum create`: make the replica images that are missing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use quorum_config::{DiskConfig, ImageFormat, Source, StorageSource};

use super::util::{human_size, load_disk, parse_size};

/// Create every missing replica image of a quorum disk.
///
/// qcow2 layers are created with imago, raw layers as sparse files. Existing
/// images are left alone; when some exist, they must agree on their size,
/// and new ones get that size. Missing backing layers are created first.
///
/// Example: quorum create examples/quorum.xml --size 1G
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Quorum disk XML (a <disk> or a <domain>).
    pub file: PathBuf,
    /// Which disk of a <domain> (its target dev); default: the first quorum disk.
    #[arg(long, value_name = "DEV")]
    pub target: Option<String>,
    /// Virtual size of new images (e.g. 10G, 512M); optional when some replica exists.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,
    /// qcow2 cluster size in bytes (default 65536).
    #[arg(long, value_name = "N")]
    pub cluster_size: Option<u32>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = load_disk(&args.file, args.target.as_deref())?;
    create_missing(&cfg, args.size, args.cluster_size, &mut std::io::stdout())?;
    Ok(ExitCode::SUCCESS)
}

fn local_path(src: &StorageSource) -> Option<&Path> {
    match &src.source {
        Source::File { path } => Some(path),
        Source::Block { dev } => Some(dev),
        Source::Nbd { .. } => None,
    }
}

/// Create what is missing; print one line per replica layer to `out`.
pub fn create_missing(
    cfg: &DiskConfig,
    size: Option<u64>,
    cluster_size: Option<u32>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    // Sizes of the replicas that exist already.
    let mut existing: Vec<(String, u64)> = Vec::new();
    for r in &cfg.replicas {
        if local_path(r).is_some_and(Path::exists) {
            let info = quorum_replica::probe(r)
                .with_context(|| format!("cannot read {}", r.display_name()))?;
            existing.push((r.display_name(), info.virtual_size));
        }
    }
    if let Some((first, first_size)) = existing.first() {
        if let Some((name, sz)) = existing.iter().find(|(_, s)| s != first_size) {
            bail!(
                "existing replicas disagree on size: {first} is {first_size} bytes, {name} is {sz} bytes; refusing to create more"
            );
        }
        if let Some(want) = size
            && want != *first_size
        {
            bail!(
                "--size {want} differs from the size of the existing replica {first} ({first_size} bytes)"
            );
        }
    }
    let size = match (size, existing.first()) {
        (Some(s), _) => s,
        (None, Some((_, s))) => *s,
        (None, None) => bail!("no replica exists yet: give --size for the new images"),
    };
    if size == 0 {
        bail!("--size must be larger than 0");
    }
    for r in &cfg.replicas {
        let layers: Vec<&StorageSource> = r.chain().collect();
        for layer in layers.into_iter().rev() {
            let Some(path) = local_path(layer) else {
                writeln!(out, "skipped {} (network replica)", layer.display_name())?;
                continue;
            };
            if path.exists() {
                writeln!(out, "kept    {} (exists)", path.display())?;
                continue;
            }
            if matches!(layer.source, Source::Block { .. }) {
                bail!(
                    "block device {} does not exist; quorum creates only files",
                    path.display()
                );
            }
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create folder {}", dir.display()))?;
            }
            quorum_replica::create(layer, size, cluster_size)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let fmt = match layer.format {
                ImageFormat::Raw => "raw, sparse",
                ImageFormat::Qcow2 => "qcow2",
            };
            writeln!(
                out,
                "created {} ({fmt}, {})",
                path.display(),
                human_size(size)
            )?;
        }
    }
    Ok(())
}
