//! The monitor's commands. Each declares its arguments; unknown, missing
//! and mistyped arguments are refused before it runs, as QEMU does.
//! Commands run on the blocking pool (they may open replicas), never on
//! the network threads.

use std::path::PathBuf;
use std::sync::Arc;

use quorum_engine::{ControlError, Disk, Latency, OpenOptions, ReplicaStats};
use serde_json::{Map, Value, json};

use super::QmpError;

/// The online scrub's rate when none is given, in bytes per second: as
/// the resync's default (and md's `speed_limit_max`), it leaves most of a
/// page cache or a fast link to the guest (measured in bench/scrub.sh:
/// 4 KiB random reads keep 0.89x of their rate, against 0.57x with no
/// limit). `rate: 0` lifts the limit.
pub const DEFAULT_SCRUB_RATE: u64 = 200 << 20;

/// What the commands work on.
#[derive(Debug)]
pub struct Context {
    /// The running disk.
    pub disk: Arc<Disk>,
    /// How serve opened its replicas (for replicas added or replaced).
    pub open_opts: OpenOptions,
    /// Relative image paths in a `backing-store` resolve against this (the
    /// directory of the disk's XML).
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Str,
    Bool,
    Int,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Str => "string",
            Ty::Bool => "boolean",
            Ty::Int => "integer",
        }
    }

    fn accepts(self, v: &Value) -> bool {
        match self {
            Ty::Str => v.is_string(),
            Ty::Bool => v.is_boolean(),
            Ty::Int => v.is_u64(),
        }
    }
}

/// One argument: name, type, required.
type Param = (&'static str, Ty, bool);

type Run = fn(&Context, &Map<String, Value>) -> Result<Value, QmpError>;

/// Every command but `qmp_capabilities` (handled by the session).
const COMMANDS: &[(&str, &[Param], Run)] = &[
    ("query-version", &[], |_, _| Ok(super::version())),
    ("query-commands", &[], |_, _| Ok(query_commands())),
    ("query-quorum", &[], |c, _| Ok(query_quorum(&c.disk))),
    (
        "quorum-replica-replace",
        &[("replica", Ty::Str, true), ("backing-store", Ty::Str, true)],
        replica_replace,
    ),
    (
        "quorum-replica-add",
        &[("backing-store", Ty::Str, true)],
        replica_add,
    ),
    (
        "quorum-replica-remove",
        &[("replica", Ty::Str, true)],
        |c, a| {
            let name = str_arg(a, "replica");
            c.disk
                .remove_replica(name)
                .map_err(|e| control(&format!("cannot remove {name}"), &e))?;
            Ok(json!({}))
        },
    ),
    (
        "quorum-scrub",
        &[("repair", Ty::Bool, true), ("rate", Ty::Int, false)],
        |c, a| {
            let repair = a.get("repair").and_then(Value::as_bool).unwrap_or(false);
            let rate = a
                .get("rate")
                .and_then(Value::as_u64)
                .unwrap_or(DEFAULT_SCRUB_RATE);
            c.disk
                .start_scrub(repair, rate)
                .map_err(|e| control("cannot start the scrub", &e))?;
            Ok(json!({}))
        },
    ),
    ("query-scrub", &[], |c, _| Ok(query_scrub(&c.disk))),
    ("quorum-scrub-cancel", &[], |c, _| {
        if c.disk.cancel_scrub() {
            Ok(json!({}))
        } else {
            Err(QmpError::generic("no scrub is running"))
        }
    }),
    (
        "quorum-set-resync-rate",
        &[("rate", Ty::Int, true)],
        |c, a| {
            let rate = a.get("rate").and_then(Value::as_u64).unwrap_or(0);
            c.disk.set_resync_rate(rate);
            Ok(json!({}))
        },
    ),
];

/// Names of every command, `qmp_capabilities` included.
pub fn names() -> Vec<&'static str> {
    let mut v = vec!["qmp_capabilities"];
    v.extend(COMMANDS.iter().map(|c| c.0));
    v
}

/// Refuse arguments `params` does not declare, miss or mistype.
fn check_args(params: &[Param], args: &Map<String, Value>) -> Result<(), QmpError> {
    if let Some(k) = args.keys().find(|k| !params.iter().any(|p| p.0 == *k)) {
        return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
    }
    for &(name, ty, required) in params {
        match args.get(name) {
            None if required => {
                return Err(QmpError::generic(format!("Parameter '{name}' is missing")));
            }
            Some(v) if !ty.accepts(v) => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for '{name}', expected: {}",
                    ty.name()
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Arguments of `qmp_capabilities`: `enable`, a list of capabilities, of
/// which this server has none.
pub fn check_capabilities_args(args: &Map<String, Value>) -> Result<(), QmpError> {
    if let Some(k) = args.keys().find(|k| *k != "enable") {
        return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
    }
    match args.get("enable") {
        None => Ok(()),
        Some(Value::Array(caps)) => match caps.first() {
            None => Ok(()),
            Some(Value::String(c)) => {
                Err(QmpError::generic(format!("Capability '{c}' not available")))
            }
            Some(_) => Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array of strings",
            )),
        },
        Some(_) => Err(QmpError::generic(
            "Invalid parameter type for 'enable', expected: array",
        )),
    }
}

/// Run command `name` (after capabilities negotiation).
pub fn execute(ctx: &Context, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let Some((_, params, run)) = COMMANDS.iter().find(|c| c.0 == name) else {
        return Err(QmpError::not_found(format!(
            "The command {name} has not been found"
        )));
    };
    check_args(params, args)?;
    run(ctx, args)
}

fn str_arg<'a>(a: &'a Map<String, Value>, name: &str) -> &'a str {
    a.get(name).and_then(Value::as_str).unwrap_or("")
}

/// A refusal from the engine, with what was being done.
fn control(what: &str, e: &ControlError) -> QmpError {
    QmpError::generic(format!("{what}: {e}"))
}

fn query_commands() -> Value {
    Value::Array(names().into_iter().map(|n| json!({"name": n})).collect())
}

/// Parse and open the replica a `backing-store` argument names.
fn open_new(ctx: &Context, xml: &str, name: &str) -> Result<quorum_engine::Member, QmpError> {
    let src = quorum_config::parse_backing_store(xml, "backing-store", &ctx.base_dir)
        .map_err(|e| QmpError::generic(format!("invalid backing-store: {e}")))?;
    let read_only = ctx.disk.options().read_only;
    quorum_engine::open_member(&src, name.to_owned(), &ctx.open_opts, read_only).map_err(|e| {
        let mut desc = format!(
            "cannot open {}: {}",
            src.display_name(),
            quorum_replica::chain(&e)
        );
        // A replacement is made by hand, at the running disk's size; the
        // generic hint (quorum create from the disk's XML) does not fit.
        let missing = matches!(&e, quorum_replica::OpenError::Io { op, source, .. }
            if *op == "open" && source.kind() == std::io::ErrorKind::NotFound);
        let hint = if missing {
            Some(format!(
                "create the image first, as large as the disk: qemu-img create -f {} {} {}",
                src.format.as_str(),
                src.display_name(),
                ctx.disk.size()
            ))
        } else {
            e.hint()
        };
        if let Some(hint) = hint {
            desc.push_str(&format!(" (hint: {hint})"));
        }
        QmpError::generic(desc)
    })
}

fn replica_replace(ctx: &Context, a: &Map<String, Value>) -> Result<Value, QmpError> {
    let name = str_arg(a, "replica");
    // Refuse an unknown name before touching the new image.
    if !ctx.disk.replicas_info().iter().any(|r| r.name == name) {
        return Err(control(
            &format!("cannot replace {name}"),
            &ControlError::NotFound(name.to_owned()),
        ));
    }
    let new = open_new(ctx, str_arg(a, "backing-store"), name)?;
    ctx.disk
        .replace_replica(name, new)
        .map_err(|e| control(&format!("cannot replace {name}"), &e))?;
    Ok(json!({}))
}

fn replica_add(ctx: &Context, a: &Map<String, Value>) -> Result<Value, QmpError> {
    // The engine names the new replica.
    let new = open_new(ctx, str_arg(a, "backing-store"), "new")?;
    let name = ctx
        .disk
        .add_replica(new)
        .map_err(|e| control("cannot add the replica", &e))?;
    Ok(json!({"replica": name}))
}

fn latency(l: &Latency) -> Value {
    json!({"count": l.count, "mean-ns": l.mean_ns(), "p99-ns": l.quantile_ns(0.99)})
}

/// `query-quorum`'s value.
pub fn query_quorum(disk: &Disk) -> Value {
    let o = disk.options();
    let stats = disk.stats();
    let d = disk.disk_stats();
    let replicas: Vec<Value> = disk
        .replicas_info()
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let s = stats
                .iter()
                .find(|s| s.node_name == r.name)
                .or_else(|| stats.get(i))
                .cloned()
                .unwrap_or_else(ReplicaStats::default);
            let mut m = json!({
                "name": r.name,
                "uri": r.uri,
                "state": r.state.as_str(),
                "missed-bytes": r.missed_bytes,
                "resync-progress": r.resync_progress,
                "reads": s.reads,
                "writes": s.writes,
                "flushes": s.flushes,
                "read-errors": s.read_errors,
                "write-errors": s.write_errors,
                "flush-errors": s.flush_errors,
                "bad-votes": s.voted_out_reads,
                "bad-vote-bytes": s.voted_out_bytes,
                "rewrites": s.rewrites,
                "rewritten-bytes": s.rewritten_bytes,
                "rewrite-errors": s.rewrite_errors,
                "timeouts": s.timeouts,
                "skipped": s.skipped,
                "latency": {
                    "read": latency(&s.read_latency),
                    "write": latency(&s.write_latency),
                    "flush": latency(&s.flush_latency),
                },
            });
            if r.state == quorum_engine::ReplicaState::Failed {
                m["reason"] = json!(r.reason);
            }
            m
        })
        .collect();
    json!({
        "id": o.id,
        "size": disk.size(),
        "threshold": o.threshold,
        "read-pattern": match o.read_pattern {
            quorum_engine::ReadPattern::Quorum => "quorum",
            quorum_engine::ReadPattern::Fifo => "fifo",
        },
        "options": {
            "rewrite-corrupted": o.rewrite_corrupted,
            "blkverify": o.blkverify,
            "read-only": o.read_only,
            "vote-granularity": match o.granularity {
                quorum_engine::Granularity::Request => json!("request"),
                quorum_engine::Granularity::Block(b) => json!(b),
            },
            "resync-rate": disk.resync_rate(),
        },
        "stats": {
            "reads": d.reads,
            "read-bytes": d.read_bytes,
            "writes": d.writes,
            "written-bytes": d.written_bytes,
            "flushes": d.flushes,
            "failed": d.failed,
            "latency": {
                "read": latency(&d.read_latency),
                "write": latency(&d.write_latency),
                "flush": latency(&d.flush_latency),
            },
        },
        "record": disk.heal_stats().map(|h| json!({
            "dirty-regions": h.dirty_regions,
            "unsettled-regions": h.unsettled_regions,
            "resync-bytes": h.resync_bytes,
            "reconciled-bytes": h.reconciled_bytes,
        })),
        "replicas": replicas,
    })
}

/// `query-scrub`'s value.
pub fn query_scrub(disk: &Disk) -> Value {
    let p = disk.scrub_progress();
    let progress = (p.done_bytes.saturating_mul(100))
        .checked_div(p.total_bytes)
        .unwrap_or(100)
        .min(100);
    let mut v = json!({
        "status": p.state,
        "repair": p.repair,
        "rate": p.rate,
        "total-bytes": p.total_bytes,
        "done-bytes": p.done_bytes,
        "progress": progress,
        "divergent": p.divergences.iter().map(crate::cmd::check::range_json).collect::<Vec<_>>(),
    });
    if let Some(e) = p.error {
        v["error"] = json!(e);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &[Param] = &[("replica", Ty::Str, true), ("rate", Ty::Int, false)];

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn arguments_are_checked_as_qemu_does() {
        assert_eq!(check_args(P, &args(json!({"replica": "r"}))), Ok(()));
        let e = |v| check_args(P, &args(v)).unwrap_err().desc;
        assert_eq!(
            e(json!({"replica": "r", "x": 1})),
            "Parameter 'x' is unexpected"
        );
        assert_eq!(e(json!({})), "Parameter 'replica' is missing");
        assert_eq!(
            e(json!({"replica": 1})),
            "Invalid parameter type for 'replica', expected: string"
        );
        assert_eq!(
            e(json!({"replica": "r", "rate": -1})),
            "Invalid parameter type for 'rate', expected: integer"
        );
    }

    #[test]
    fn capabilities_none_offered() {
        assert_eq!(check_capabilities_args(&args(json!({}))), Ok(()));
        assert_eq!(
            check_capabilities_args(&args(json!({"enable": []}))),
            Ok(())
        );
        assert_eq!(
            check_capabilities_args(&args(json!({"enable": ["oob"]})))
                .unwrap_err()
                .desc,
            "Capability 'oob' not available"
        );
    }

    #[test]
    fn every_command_is_listed_once() {
        let n = names();
        let mut sorted = n.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), n.len());
        for c in [
            "query-version",
            "query-commands",
            "query-quorum",
            "quorum-replica-replace",
            "quorum-replica-add",
            "quorum-replica-remove",
            "quorum-scrub",
            "query-scrub",
            "quorum-scrub-cancel",
            "quorum-set-resync-rate",
        ] {
            assert!(n.contains(&c), "{c}");
        }
    }
}
