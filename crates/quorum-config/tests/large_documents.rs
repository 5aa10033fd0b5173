//! Invalid documents of about 1 MB: refused with a capped error list, and in
//! time linear in their size.
//!
//! Before the fix every error's line and column was counted from the start
//! of the text, so k errors in n bytes cost O(n * k): a 1 MB document with
//! 50,000 errors took minutes (19-28 s in release). The bound below is
//! generous (the linear parser needs under half a second of it, unoptimised) and
//! the quadratic one misses it by far; the error-count assertions hold
//! whatever the machine's speed.

use std::path::Path;
use std::time::{Duration, Instant};

use quorum_config::{ConfigErrors, ErrorKind, MAX_ERRORS, parse_str};

const ONE_MB: usize = 1 << 20;
const BOUND: Duration = Duration::from_secs(5);

/// A quorum disk with `filler` repeated until the text passes 1 MB,
/// each copy followed by `sep`.
fn big_disk(filler: impl Fn(usize) -> String, sep: &str) -> (String, usize) {
    let mut s = String::from("<disk type='quorum'>\n<threshold value='1'/>\n");
    s.push_str(
        "<backingStore type='file'><format type='raw'/><source file='r0.raw'/></backingStore>\n",
    );
    let mut n = 0;
    while s.len() < ONE_MB {
        s.push_str(&filler(n));
        s.push_str(sep);
        n += 1;
    }
    s.push_str("<target dev='vda'/>\n</disk>\n");
    (s, n)
}

/// Parse `text`, returning its errors and how long it took.
fn refuse(text: &str) -> (ConfigErrors, Duration) {
    let start = Instant::now();
    let res = parse_str(text, "big.xml", Path::new("/base"), None);
    let took = start.elapsed();
    (res.expect_err("document must be refused"), took)
}

/// The capped list: MAX_ERRORS errors, then one line saying how many more.
fn assert_capped(e: &ConfigErrors, total: usize) {
    let errs = e.errors();
    assert_eq!(errs.len(), MAX_ERRORS + 1, "{e}");
    assert!(
        errs[..MAX_ERRORS]
            .iter()
            .all(|x| x.kind != ErrorKind::Omitted),
        "{e}"
    );
    let last = &errs[MAX_ERRORS];
    assert_eq!(last.kind, ErrorKind::Omitted);
    assert_eq!(
        last.message,
        format!("{} more errors from here on not shown", total - MAX_ERRORS)
    );
}

#[test]
fn a_megabyte_of_unknown_elements_on_many_lines_is_refused_fast_with_a_capped_list() {
    let (text, n) = big_disk(|i| format!("<bogus{i} x='1'/>"), "\n");

    let (e, took) = refuse(&text);

    assert_capped(&e, n);
    let first = &e.errors()[0];
    assert_eq!(
        (first.line, first.col, first.message.as_str()),
        (4, 1, "unknown element <bogus0> in <disk>")
    );
    // The note sits where the first error left out is.
    let note = &e.errors()[MAX_ERRORS];
    assert_eq!((note.line, note.col), (4 + MAX_ERRORS as u32, 1));
    assert_eq!(
        note.to_string(),
        format!(
            "big.xml:{}:1: too many errors: {} more errors from here on not shown",
            4 + MAX_ERRORS,
            n - MAX_ERRORS
        )
    );
    assert!(took < BOUND, "{n} errors in 1 MB took {took:?}");
}

#[test]
fn a_megabyte_of_errors_on_one_line_is_refused_fast() {
    // Columns, not lines, grow here: counting characters from the start of the
    // line for every error is quadratic too.
    let (text, n) = big_disk(|i| format!("<bogus{i} é='1'/>"), "");

    let (e, took) = refuse(&text);

    assert_capped(&e, n);
    let second = &e.errors()[1];
    assert_eq!(
        (second.line, second.col),
        (4, 16),
        "columns count characters ('é' is one), not bytes: {e}"
    );
    assert!(took < BOUND, "{n} elements on one line took {took:?}");
}

#[test]
fn a_megabyte_of_replicas_sharing_paths_is_refused_fast() {
    // Thousands of replicas, each a qcow2 over one shared base (allowed), every
    // one with the same top path (refused): the duplicate-path rule and the
    // repeated-element check must not compare each layer with all before it.
    let (text, n) = big_disk(
        |_| {
            "<backingStore type='file'><format type='qcow2'/><source file='top.qcow2'/>\
             <backingStore type='file'><format type='raw'/><source file='base.raw'/>\
             </backingStore></backingStore>"
                .to_string()
        },
        "\n",
    );

    let (e, took) = refuse(&text);

    assert_capped(&e, n - 1);
    assert_eq!(
        e.errors()[0].message,
        "replica path '/base/top.qcow2' is used more than once (first at line 4, column 49)"
    );
    assert!(took < BOUND, "{n} replicas took {took:?}");
}
