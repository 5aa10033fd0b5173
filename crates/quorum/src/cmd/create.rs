//! `quorum create`: make the replica images that are missing.
//!
//! Every argument and every layer is checked before the first image is made;
//! if making one fails anyway, the images (and folders) made so far by this
//! run are removed again, so an error leaves the disk as it was.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use quorum_config::{DiskConfig, ImageFormat, Source, StorageSource};

use super::util::{human_size, load_disk, parse_size};

/// Images are made in whole 512-byte sectors, as `qemu-img create` makes them.
const SECTOR: u64 = 512;

/// Create every missing replica image of a quorum disk.
///
/// qcow2 layers are created with imago, raw layers as sparse files. Existing
/// images are left alone; when some exist, they must agree on their size,
/// and new ones get that size. Missing backing layers are created first.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Checks everything first (sizes, cluster size, block devices that do not exist) and
creates nothing when anything is wrong; an image that still fails to be made takes the
ones made before it with it.

--size takes bytes or K, M, G, T (binary units). A size that is not a multiple of 512
is rounded up to one, as `qemu-img create` does (1000 becomes 1024). --cluster-size
takes the same units and must be a power of two from 512 to 2M, as in qemu-img; it
applies to qcow2 images (raw images have no clusters).

A replica created next to replicas that already hold data starts empty. create
records it in the disk's record (see --state) as a new replica: it never votes, and the
next `quorum serve` rebuilds it online from the others (or `quorum check --repair
FILE` does, offline). `quorum serve --create-missing` does the same; with
--no-tracking, which keeps no record, it refuses that case instead.

Examples:
  quorum create examples/quorum.xml --size 1G
  quorum create disk.xml --size 20G --cluster-size 2M
  quorum create disk.xml && quorum serve disk.xml   # replace a lost replica; rebuilt online")]
pub struct Args {
    /// Quorum disk XML (a <disk>, or a <domain> with it in <devices> or in
    /// quorum's <metadata>; `-` reads standard input).
    pub file: PathBuf,
    /// Which disk of a <domain> (its target dev); default: the first quorum disk.
    #[arg(long, value_name = "DEV")]
    pub target: Option<String>,
    /// Virtual size of new images (e.g. 10G, 512M), rounded up to a multiple
    /// of 512 bytes; optional when some replica exists.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,
    /// qcow2 cluster size (e.g. 64K, 2M): a power of two from 512 bytes to
    /// 2 MiB; default 64K.
    #[arg(long, value_name = "SIZE", value_parser = parse_cluster_size)]
    pub cluster_size: Option<u32>,
    #[command(flatten)]
    pub record: super::state::StateArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = load_disk(&args.file, args.target.as_deref())?;
    let new_beside_data = create_images(
        &cfg,
        args.size,
        args.cluster_size,
        IntoPopulated::Allow,
        &mut std::io::stdout(),
    )?;
    if !new_beside_data.is_empty() {
        let indices = indices_of(&cfg, &new_beside_data);
        let recorded = match args.record.path(&cfg) {
            Some(path) => mark_new_in_record(&cfg, &path, args.record.missed_granularity, &indices),
            None => Err(anyhow::anyhow!("--no-tracking keeps no record")),
        };
        let _ = match recorded {
            Ok(()) => writeln!(
                std::io::stderr(),
                "quorum: note: {} new and empty while the other replicas hold data; recorded as \
                 new: the next `quorum serve {}` rebuilds {} online (or `quorum check --repair {}` \
                 offline)",
                list(&new_beside_data),
                args.file.display(),
                if new_beside_data.len() == 1 {
                    "it"
                } else {
                    "them"
                },
                args.file.display()
            ),
            Err(e) => writeln!(
                std::io::stderr(),
                "quorum: note: {} new and empty while the other replicas hold data, and could not \
                 be recorded as new ({e:#}); copy the data onto {} before serving: quorum check \
                 --repair {}",
                list(&new_beside_data),
                if new_beside_data.len() == 1 {
                    "it"
                } else {
                    "them"
                },
                args.file.display()
            ),
        };
    }
    Ok(ExitCode::SUCCESS)
}

/// Indices of the replicas whose top image is one of `paths`.
fn indices_of(cfg: &DiskConfig, paths: &[String]) -> Vec<usize> {
    cfg.replicas
        .iter()
        .enumerate()
        .filter(|(_, r)| local_path(r).is_some_and(|p| paths.iter().any(|q| Path::new(q) == p)))
        .map(|(i, _)| i)
        .collect()
}

/// Mark `indices` new in the disk's record at `path` (every chunk missed).
fn mark_new_in_record(
    cfg: &DiskConfig,
    path: &Path,
    granularity: u64,
    indices: &[usize],
) -> anyhow::Result<()> {
    let size = cfg
        .replicas
        .iter()
        .find_map(|r| quorum_replica::probe(r).ok())
        .map(|p| p.virtual_size)
        .context("no replica could be probed for the disk's size")?;
    quorum_engine::record::mark_new(
        path,
        size,
        quorum_engine::REGION,
        granularity,
        cfg.replicas.len(),
        indices,
    )?;
    Ok(())
}

/// `--cluster-size`: a size like `--size`, a power of two from 512 to 2 MiB.
pub fn parse_cluster_size(s: &str) -> anyhow::Result<u32> {
    let n = parse_size(s)?;
    if !n.is_power_of_two() || !(512..=2 << 20).contains(&n) {
        bail!(
            "invalid cluster size '{s}' ({n} bytes): it must be a power of two from 512 to 2M \
             (for example 64K or 2M)"
        );
    }
    Ok(u32::try_from(n).expect("at most 2 MiB"))
}

/// Create what is missing for `serve --create-missing`, as `quorum create`.
/// Empty replicas beside replicas that hold data are returned (by index)
/// for the engine to rebuild as new; without `into_populated` (no record
/// to track the rebuild) they are refused, saying what to run instead.
/// Prints one line per layer to `out`.
pub fn create_missing(
    cfg: &DiskConfig,
    size: Option<u64>,
    cluster_size: Option<u32>,
    into_populated: bool,
    out: &mut dyn Write,
) -> anyhow::Result<Vec<usize>> {
    let mode = if into_populated {
        IntoPopulated::Allow
    } else {
        IntoPopulated::Refuse
    };
    let beside = create_images(cfg, size, cluster_size, mode, out)?;
    Ok(indices_of(cfg, &beside))
}

/// Whether new replicas may join replicas that hold data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IntoPopulated {
    /// `quorum create`: yes (the caller reminds to run `check --repair`).
    Allow,
    /// `serve --create-missing`: no.
    Refuse,
}

fn local_path(src: &StorageSource) -> Option<&Path> {
    match &src.source {
        Source::File { path } => Some(path),
        Source::Block { dev } => Some(dev),
        Source::Nbd { .. } => None,
    }
}

/// One layer, in creation order (each replica's chain deepest first).
enum Step<'a> {
    /// A network layer: nothing to make.
    Network(&'a StorageSource),
    /// The file exists (or an earlier step makes it).
    Keep(&'a Path),
    /// Make this file.
    Make(&'a StorageSource, &'a Path),
}

/// `a`, `a and b`, `a, b and c`.
fn list(names: &[String]) -> String {
    match names {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Create what is missing; returns the top layers made beside replicas that
/// hold data (empty unless `populated` is `Allow`).
fn create_images(
    cfg: &DiskConfig,
    size: Option<u64>,
    cluster_size: Option<u32>,
    populated: IntoPopulated,
    out: &mut dyn Write,
) -> anyhow::Result<Vec<String>> {
    // 1. The size, as qemu-img would make it.
    let size = match size {
        Some(s) => {
            let rounded = s
                .checked_next_multiple_of(SECTOR)
                .with_context(|| format!("--size {s} is too large"))?;
            if rounded != s {
                writeln!(
                    out,
                    "note: --size {s} is rounded up to {rounded} bytes, a multiple of 512, as \
                     qemu-img create does"
                )?;
            }
            Some(rounded)
        }
        None => None,
    };
    if size == Some(0) {
        bail!("--size must be larger than 0");
    }

    // 2. Sizes of the replicas that exist already.
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

    // 3. What to make, layer by layer; refuse what cannot be made before making anything.
    let mut steps = Vec::new();
    let mut planned: HashSet<&Path> = HashSet::new();
    let mut new_tops: Vec<String> = Vec::new();
    for r in &cfg.replicas {
        let layers: Vec<&StorageSource> = r.chain().collect();
        for layer in layers.into_iter().rev() {
            let Some(path) = local_path(layer) else {
                steps.push(Step::Network(layer));
                continue;
            };
            if path.exists() || planned.contains(path) {
                steps.push(Step::Keep(path));
                continue;
            }
            if matches!(layer.source, Source::Block { .. }) {
                bail!(
                    "block device {} does not exist; quorum creates only files (nothing was created)",
                    path.display()
                );
            }
            planned.insert(path);
            steps.push(Step::Make(layer, path));
            if std::ptr::eq(layer, r) {
                new_tops.push(path.display().to_string());
            }
        }
    }
    if steps.iter().any(|s| matches!(s, Step::Make(..))) && size.is_none() && existing.is_empty() {
        bail!("no replica exists yet: give --size for the new images");
    }
    let size = size.or(existing.first().map(|(_, s)| *s)).unwrap_or(0);

    // 4. New replicas beside replicas that hold data would vote as if in sync.
    let mut beside_data = Vec::new();
    if !new_tops.is_empty() {
        let holding: Vec<String> = cfg
            .replicas
            .iter()
            .filter(|r| local_path(r).is_none_or(|p| !planned.contains(p)))
            .filter(|r| holds_data(r))
            .map(StorageSource::display_name)
            .collect();
        if !holding.is_empty() {
            if populated == IntoPopulated::Refuse {
                bail!(
                    "refusing to create {} empty beside {}, which hold{} data: an empty replica \
                     would vote as if it were in sync, and --no-tracking keeps no record to \
                     rebuild it as new. Serve without --no-tracking, or run `quorum create FILE` \
                     and `quorum check --repair FILE`, FILE being this disk's XML",
                    list(&new_tops),
                    list(&holding),
                    if holding.len() == 1 { "s" } else { "" }
                );
            }
            beside_data = new_tops;
        }
    }

    // 5. Make them; on failure remove what this run made.
    let mut made: Vec<PathBuf> = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    let res = make_all(&steps, size, cluster_size, &mut made, &mut dirs, out);
    if let Err(e) = res {
        for p in made.iter().rev() {
            let _ = std::fs::remove_file(p);
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
        if made.is_empty() {
            return Err(e);
        }
        return Err(e.context(format!(
            "removed again the {} image{} made before ({})",
            made.len(),
            if made.len() == 1 { "" } else { "s" },
            list(
                &made
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
            )
        )));
    }
    Ok(beside_data)
}

fn make_all(
    steps: &[Step<'_>],
    size: u64,
    cluster_size: Option<u32>,
    made: &mut Vec<PathBuf>,
    dirs: &mut Vec<PathBuf>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    for step in steps {
        let (layer, path) = match step {
            Step::Network(layer) => {
                writeln!(out, "skipped {} (network replica)", layer.display_name())?;
                continue;
            }
            Step::Keep(path) => {
                writeln!(out, "kept    {} (exists)", path.display())?;
                continue;
            }
            Step::Make(layer, path) => (layer, path),
        };
        if let Some(dir) = path.parent() {
            let mut missing: Vec<PathBuf> = dir
                .ancestors()
                .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
                .map(Path::to_path_buf)
                .collect();
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create folder {}", dir.display()))?;
            missing.reverse();
            dirs.extend(missing);
        }
        quorum_replica::create(layer, size, cluster_size)
            .with_context(|| format!("cannot create {}", path.display()))?;
        made.push(path.to_path_buf());
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
    Ok(())
}

/// Whether reads of `src` may return anything but zeroes. Ranges its
/// allocation map calls zero are skipped; allocated ranges are read and
/// checked, up to `ZERO_CHECK_BUDGET` bytes in all (qemu-img itself allocates
/// the first 4 KiB of a new raw image). Whatever cannot be told within that
/// (it does not open, a read fails, the budget runs out) counts as data.
fn holds_data(src: &StorageSource) -> bool {
    const ZERO_CHECK_BUDGET: u64 = 64 << 20;
    const STEP: u64 = 1 << 20;
    let opts = quorum_replica::OpenOptions {
        read_only: true,
        no_locking: true,
        ..Default::default()
    };
    let Ok(r) = quorum_replica::open(src, &opts) else {
        return true;
    };
    let size = r.size();
    let mut budget = ZERO_CHECK_BUDGET;
    let mut buf = Vec::new();
    let mut off = 0;
    // Each answer covers at least one extent; a bound keeps a lying backend finite.
    for _ in 0..1_000_000 {
        if off >= size {
            return false;
        }
        let Ok(extents) = r.block_status(off, size - off) else {
            return true;
        };
        if extents.is_empty() {
            return true;
        }
        for e in extents {
            let end = off + e.length;
            if !e.zero {
                while off < end {
                    let n = STEP.min(end - off);
                    if n > budget {
                        return true;
                    }
                    budget -= n;
                    buf.resize(n as usize, 0);
                    if r.read_at(&mut buf, off).is_err() || buf.iter().any(|b| *b != 0) {
                        return true;
                    }
                    off += n;
                }
            }
            off = end;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_sizes_take_units_and_must_be_powers_of_two_from_512_to_2m() {
        assert_eq!(parse_cluster_size("64K").unwrap(), 65536);
        assert_eq!(parse_cluster_size("2M").unwrap(), 2 << 20);
        assert_eq!(parse_cluster_size("512").unwrap(), 512);
        for bad in ["1000", "256", "4M", "0", "3K", "x"] {
            assert!(parse_cluster_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lists_read_as_english() {
        let s = |v: &[&str]| list(&v.iter().map(|x| (*x).to_string()).collect::<Vec<_>>());
        assert_eq!(s(&["a"]), "a");
        assert_eq!(s(&["a", "b"]), "a and b");
        assert_eq!(s(&["a", "b", "c"]), "a, b and c");
    }
}
