//! Helpers shared by subcommands.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, bail};
use quorum_config::{ConfigError, ConfigErrors, DiskConfig, ErrorKind, Loaded};

/// The label errors carry for a document read from standard input (`-`).
pub const STDIN_LABEL: &str = "<stdin>";

/// Read and validate the disk in `file`: a `<disk>`, a `<domain>` (with the
/// disk under `<devices>` or in quorum's `<metadata>`), or `-` for standard
/// input (relative paths then resolve against the current folder). Notes on
/// what was ignored go to stderr.
pub fn read_disk(file: &Path, target: Option<&str>) -> Result<Loaded, ConfigErrors> {
    let loaded = if file.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut bytes)
            .map_err(|e| ConfigError {
                file: STDIN_LABEL.into(),
                line: 0,
                col: 0,
                kind: ErrorKind::Io,
                message: e.to_string(),
            })?;
        quorum_config::parse_bytes(&bytes, STDIN_LABEL, Path::new("."), target)?
    } else {
        quorum_config::load_full(file, target)?
    };
    for n in &loaded.notes {
        eprintln!("{n}");
    }
    Ok(loaded)
}

/// Load and validate a disk ([`read_disk`]); errors print as libvirt-style lines.
pub fn load_disk(file: &Path, target: Option<&str>) -> anyhow::Result<DiskConfig> {
    read_disk(file, target)
        .map(|l| l.disk)
        .map_err(|errs| anyhow::anyhow!("{}", errs.to_string().trim_end()))
}

/// Parse a size such as `1G`, `512MiB`, `10k` or `1048576` (binary units).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        bail!("invalid size '{s}': expected a number with an optional unit (K, M, G, T)");
    }
    let n: u64 = t[..digits]
        .parse()
        .with_context(|| format!("invalid size '{s}'"))?;
    let shift = match t[digits..].to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        unit => bail!("invalid size '{s}': unknown unit '{unit}' (use K, M, G or T)"),
    };
    n.checked_mul(1 << shift)
        .with_context(|| format!("size '{s}' is too large"))
}

/// `1.5 GiB`-style rendering.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_with_binary_unit_parses() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
    }

    #[test]
    fn plain_size_is_bytes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
    }

    #[test]
    fn size_with_unknown_unit_is_refused() {
        assert!(parse_size("3 parsecs").is_err());
    }
}
