//! A fuzz harness on the stable toolchain: mutations of the golden cases and the
//! example pipelines and configs are fed, in process, to what `millrace validate`
//! calls (the pipeline and daemon-config parsers, then the rendering of their
//! reports). Every input must give a result (no panic), within 5 s (no hang),
//! and every error must point at a line and column inside the file; one input in
//! a thousand also goes through the real binary, which must exit 0 or 78.
//!
//! `MILLRACE_FUZZ_SECS` (default 3) bounds the run, `MILLRACE_FUZZ_SEED` repeats
//! one: input `n` of a seed is always the same, so a failure reproduces with the
//! seed the test prints. A failing input is also written under
//! `CARGO_TARGET_TMPDIR/fuzz/`, and the input being parsed is always in
//! `fuzz/current.toml` (what a stack overflow, which aborts the process, leaves).

use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use millrace::definition::{self, Environment};
use millrace::diagnostic::{Report, Severity};

/// SplitMix64: small, fast, and the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Pipeline,
    Config,
}

struct Seed {
    path: PathBuf,
    bytes: Vec<u8>,
    kind: Kind,
}

fn seeds() -> Vec<Seed> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = root.join("../config");
    let mut out = Vec::new();
    let mut add = |path: PathBuf, kind: Kind| {
        let bytes = std::fs::read(&path).expect("read seed");
        out.push(Seed { path, bytes, kind });
    };
    let tomls = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = walkdir::WalkDir::new(dir)
            .into_iter()
            .filter_map(Result::ok)
            .map(|e| e.into_path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        v.sort();
        v
    };
    for p in tomls(&root.join("tests/ui")) {
        add(p, Kind::Pipeline);
    }
    for p in tomls(&config) {
        // Daemon configs are named millrace.toml; everything else is a pipeline
        // (config/pipelines/**, config/cluster/retrain-on-slurm.toml).
        let kind = if p.file_name().is_some_and(|n| n == "millrace.toml") {
            Kind::Config
        } else {
            Kind::Pipeline
        };
        add(p, kind);
    }
    assert!(out.len() >= 20, "only {} seeds", out.len());
    out
}

/// Pipelines are checked against the example configs' datastores and targets
/// (and no module registry), as `millrace validate --config` would.
fn environment(seeds: &[Seed]) -> Environment {
    let mut env = Environment::default();
    for s in seeds.iter().filter(|s| s.kind == Kind::Config) {
        let (c, report) = millrace::config::parse_bytes(&s.path, s.bytes.clone());
        let c = c.unwrap_or_else(|| panic!("example config is invalid:\n{report}"));
        let e = c.environment();
        for d in e.datastores {
            if !env.datastores.contains(&d) {
                env.datastores.push(d);
            }
        }
        env.computes.extend(e.computes);
    }
    env
}

const NON_ASCII: &[&str] = &[
    "é",
    "café",
    "naïve",
    "日本語",
    "🦀",
    "e\u{301}",
    "\u{200B}",
    "\u{FEFF}",
    "\u{202E}",
    "\u{10FFFF}",
    "ß",
    "Ω",
    "\u{a0}",
    "\u{2028}",
    "ｗａｓｍ",
    "\u{1F468}\u{200D}\u{1F469}",
];

const INVALID_UTF8: &[&[u8]] = &[
    b"\xff",
    b"\xfe\xff",
    b"\xc3",
    b"\xc3\x28",
    b"\xe6\x97",
    b"\xed\xa0\x80",
    b"\xc0\x80",
    b"\xf4\x90\x80\x80",
    b"\x80",
    b"\xf0\x9f\xa6",
];

/// Text that means something to TOML or to millrace's own checks.
const TOKENS: &[&str] = &[
    "\"",
    "'",
    "\"\"\"",
    "'''",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "=",
    ",",
    ".",
    "#",
    "\n",
    "\r",
    "\r\n",
    "\t",
    "\\",
    "\\u00e9",
    "\\U0001F980",
    "\\uD800",
    "\\x",
    "${",
    "$${",
    "${params.",
    "${params.x}",
    "${params.é}",
    "${params.}",
    "${env.HOME}",
    "}",
    "$",
    "inputs.",
    "step.out",
    "[[step]]\n",
    "[[trigger]]\n",
    "[params]\n",
    "[inputs.x]\n",
    "[api]\n",
    "[compute.x]\n",
    "[datastores.x]\n",
    "name = \"x\"\n",
    "wasm = \"x.wasm\"\n",
    "args = [\"café\"]\n",
    "env = { A = \"é\" }\n",
    "cron = \"0 3 * * *\"\n",
    "watch = \"**/*.csv\"\n",
    "after = \"x\"\n",
    "timeout = \"1s\"\n",
    "memory = \"1GiB\"\n",
    "cpus = 1.5\n",
    "true",
    "false",
    "nan",
    "inf",
    "-inf",
    "+inf",
    "0x",
    "0o",
    "0b",
    "1e",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    "1979-05-27",
    "_",
    "-",
    "+",
    "0",
    "00",
    "-0",
    "1_000",
];

const NUMBERS: &[&str] = &[
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "99999999999999999999999999999999999999999",
    "0xffffffffffffffffff",
    "0o7777777777777777777777777",
    "0b11111111111111111111111111111111111111111111111111111111111111111",
    "1e308",
    "1e309",
    "-1e400",
    "1e-400",
    "4.9e-324",
    "1.7976931348623157e308",
];

/// Strings that reach the duration, size, cron, glob, name and reference checks.
const STRINGS: &[&str] = &[
    "99999999999999999999999999s",
    "18446744073709551615s",
    "18446744073709551616ns",
    "584942417355y",
    "99999999999999y",
    "1000000000000000000000000d",
    "0s",
    "1 µs",
    "1µs",
    "1 ｓ",
    "1 sé",
    "1é",
    "é1s",
    "1e30GiB",
    "99999999999999999999999TiB",
    "18446744073709551615",
    "18446744073709551616",
    "0.5",
    ".",
    "1.2.3MiB",
    "1 KiBé",
    "1 Kí",
    "4GiB",
    "5GiB",
    "* * * * * * *",
    "60 24 32 13 8",
    "*/0 * * * *",
    "0/99999999999999999999 * * * *",
    "1-99999999999 * * * *",
    "L * * * *",
    "0 0 31W * *",
    "0 0 * * 5#9",
    "0 0 29 2 *",
    "@yearly",
    "@reboot",
    "CRON_TZ=Mars/Base * * * * *",
    "{a,{b,{c,{d,{e,{f}}}}}}",
    "[[[[[[[[[[",
    "**/**/**/**/*.csv",
    "/etc/passwd",
    "../../../../etc",
    "a\0b",
    "\u{0}",
    "\u{1b}[31m",
    "inputs..x",
    "é.é",
    ".x",
    "x.",
    "Europe/Amsterdam",
    "Europe/Ämsterdam",
    "UTC+99",
    "[::1]:99999",
    "0.0.0.0:0",
    "unix://é",
];

/// One input: a seed with 1–4 stacked mutations.
fn mutate(rng: &mut Rng, seeds: &[Seed]) -> (usize, Vec<u8>) {
    let which = rng.below(seeds.len());
    let mut b = seeds[which].bytes.clone();
    if rng.chance(40) {
        // Values only: the file stays TOML, so the checks behind the parser
        // (names, durations, sizes, cron, globs, references, interpolation) see it.
        for _ in 0..1 + rng.below(3) {
            mutate_value(rng, &mut b);
        }
    } else {
        for _ in 0..1 + rng.below(4) {
            mutate_once(rng, seeds, &mut b);
        }
    }
    (which, b)
}

/// The contents of the one-line basic strings (`"…"` outside comments).
fn string_values(b: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = None;
    let mut i = 0;
    while i < b.len() {
        match (b[i], start) {
            (b'\n', _) => start = None,
            (b'#', None) => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            (b'\\', Some(_)) => i += 1,
            (b'"', None) => start = Some(i + 1),
            (b'"', Some(s)) => {
                out.push(s..i);
                start = None;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

fn mutate_value(rng: &mut Rng, b: &mut Vec<u8>) {
    let strings = string_values(b);
    if strings.is_empty() || rng.chance(15) {
        // A number instead.
        if let Some(i) = b.iter().position(|c| c.is_ascii_digit()) {
            let end = b[i..]
                .iter()
                .position(|c| !c.is_ascii_alphanumeric() && *c != b'.' && *c != b'_')
                .map_or(b.len(), |e| i + e);
            b.splice(i..end, rng.pick(NUMBERS).bytes());
        }
        return;
    }
    let r = rng.pick(&strings).clone();
    let escapes: &[&str] = &[
        "\\u00e9",
        "\\U0001F980",
        "\\\\",
        "\\\"",
        "\\t",
        "\\u0000",
        "\\u001b",
    ];
    let piece: Vec<u8> = match rng.below(5) {
        0 | 1 => rng.pick(STRINGS).as_bytes().to_vec(),
        2 => rng.pick(NON_ASCII).as_bytes().to_vec(),
        3 => rng.pick(escapes).as_bytes().to_vec(),
        _ => format!(
            "{}${{params.{}}}{}",
            rng.pick(NON_ASCII),
            rng.pick(&["x", "é", "", "seed", "lr"]),
            rng.pick(NON_ASCII)
        )
        .into_bytes(),
    };
    // Replace the content, or put the piece somewhere in it (at a character
    // boundary, or not: that is a test of its own).
    if rng.chance(50) {
        b.splice(r, piece);
    } else {
        let at = r.start + rng.below(r.len() + 1);
        b.splice(at..at, piece);
    }
}

/// A position, often just after a `"` (inside a string value) or at a line start.
fn position(rng: &mut Rng, b: &[u8]) -> usize {
    if b.is_empty() {
        return 0;
    }
    let at = rng.below(b.len() + 1);
    match rng.below(3) {
        0 => at,
        1 => b[at..]
            .iter()
            .position(|&c| c == b'"')
            .map_or(at, |i| at + i + 1),
        _ => b[..at]
            .iter()
            .rposition(|&c| c == b'\n')
            .map_or(0, |i| i + 1),
    }
}

fn nested(rng: &mut Rng) -> Vec<u8> {
    let depth = *rng.pick(&[10, 79, 80, 81, 200, 1_000, 10_000, 100_000]);
    let close = rng.chance(50);
    let (open, shut, prefix) = match rng.below(5) {
        0 => ("[", "]", "a = "),
        1 => ("{x=", "}", "a = "),
        2 => ("[{x=", "}]", "a = "),
        3 => ("a.", "", ""),
        _ => ("[[", "]]", "args = "),
    };
    let mut s = String::from(prefix);
    s += &open.repeat(depth);
    if open == "a." {
        s += "a = 1";
    } else {
        s += "1";
        if close {
            s += &shut.repeat(depth);
        }
    }
    s.push('\n');
    if rng.chance(30) {
        // As a table header: [a.a.a…] or [[step.a.a…]].
        s = format!("[{}a]\n", "a.".repeat(depth));
    }
    s.into_bytes()
}

fn mutate_once(rng: &mut Rng, seeds: &[Seed], b: &mut Vec<u8>) {
    let len = b.len();
    match rng.below(14) {
        // Byte flips.
        0 => {
            for _ in 0..1 + rng.below(4) {
                if !b.is_empty() {
                    let i = rng.below(b.len());
                    if rng.chance(50) {
                        b[i] ^= 1 << rng.below(8);
                    } else {
                        b[i] = rng.next() as u8;
                    }
                }
            }
        }
        // Truncation.
        1 => b.truncate(rng.below(len + 1)),
        // Delete a slice.
        2 if len > 0 => {
            let from = rng.below(len);
            let to = (from + 1 + rng.below(64)).min(len);
            b.drain(from..to);
        }
        // Duplicate a slice.
        3 if len > 0 => {
            let from = rng.below(len);
            let to = (from + 1 + rng.below(256)).min(len);
            let piece = b[from..to].to_vec();
            let at = position(rng, b);
            b.splice(at..at, piece);
        }
        // Splice in a slice of another seed.
        4 => {
            let other = &rng.pick(seeds).bytes;
            if !other.is_empty() {
                let from = rng.below(other.len());
                let to = (from + 1 + rng.below(512)).min(other.len());
                let at = position(rng, b);
                b.splice(at..at, other[from..to].iter().copied());
            }
        }
        5 | 6 => {
            let at = position(rng, b);
            let t = rng.pick(NON_ASCII).as_bytes();
            b.splice(at..at, t.iter().copied());
        }
        7 => {
            let at = position(rng, b);
            let t = *rng.pick(INVALID_UTF8);
            b.splice(at..at, t.iter().copied());
        }
        8 => {
            let at = position(rng, b);
            let t = rng.pick(TOKENS).as_bytes();
            b.splice(at..at, t.iter().copied());
        }
        // A number replaced by a huge one (or inserted).
        9 => {
            let digit = b.iter().position(|c| c.is_ascii_digit());
            let n = rng.pick(NUMBERS).as_bytes();
            match digit {
                Some(i) if rng.chance(70) => {
                    let end = b[i..]
                        .iter()
                        .position(|c| !c.is_ascii_alphanumeric() && *c != b'.' && *c != b'_')
                        .map_or(b.len(), |e| i + e);
                    b.splice(i..end, n.iter().copied());
                }
                _ => {
                    let at = position(rng, b);
                    b.splice(at..at, n.iter().copied());
                }
            }
        }
        // A string's content replaced by one that reaches a deeper check.
        10 => {
            let quotes: Vec<usize> = b
                .iter()
                .enumerate()
                .filter(|(_, c)| **c == b'"')
                .map(|(i, _)| i)
                .collect();
            let t = rng.pick(STRINGS).as_bytes();
            if quotes.len() >= 2 {
                let k = rng.below(quotes.len() - 1);
                b.splice(quotes[k] + 1..quotes[k + 1], t.iter().copied());
            }
        }
        11 => {
            let at = position(rng, b);
            b.splice(at..at, nested(rng));
        }
        // A long line: a long key, string, comment or run of one character.
        12 => {
            let n = if rng.chance(10) {
                1 << 20
            } else {
                1 + rng.below(1 << 16)
            };
            let at = position(rng, b);
            let piece = match rng.below(4) {
                0 => format!("k{} = 1\n", "k".repeat(n)),
                1 => format!("x = \"{}\"\n", "é".repeat(n / 2)),
                2 => format!("# {}\n", "🦀".repeat(n / 4)),
                _ => "$".repeat(n),
            };
            b.splice(at..at, piece.into_bytes());
        }
        // Many lines or tables: a repeated step.
        _ => {
            let n = 1 + rng.below(2000);
            let piece = if rng.chance(30) {
                "[[step]]\nname = \"s\"\nwasm = \"x.wasm\"\n".repeat(n)
            } else if rng.chance(50) {
                // A chain (or a ring) of steps, each reading the one before.
                let ring = rng.chance(50);
                (0..n)
                    .map(|i| {
                        let from = if i > 0 { i - 1 } else if ring { n - 1 } else { n };
                        format!(
                            "[[step]]\nname = \"s{i}\"\nwasm = \"x.wasm\"\noutputs = [\"o\"]\ninputs = {{ x = \"s{from}.o\" }}\n"
                        )
                    })
                    .collect()
            } else {
                "\n".repeat(n * 10)
            };
            let at = position(rng, b);
            b.splice(at..at, piece.into_bytes());
        }
    }
}

/// What `validate` does with a file's bytes: check, then print the report (text and
/// JSON). Returns the problems found with the result (panics are caught outside).
fn check(seed: &Seed, kind: Kind, bytes: Vec<u8>, env: &Environment) -> Checked {
    let (valid, report) = match kind {
        Kind::Pipeline => {
            let (p, r) = millrace::graph::parse_bytes(&seed.path, bytes, env);
            if let Some(p) = &p {
                // What a run does with it: params resolved, args interpolated.
                let params = p.resolve_params(&[]).unwrap_or_default();
                let get = |n: &str| {
                    params
                        .iter()
                        .find(|(k, _)| k == n)
                        .map(|(_, v)| v.to_string())
                };
                for s in &p.steps {
                    for a in &s.args {
                        definition::interpolate(a.get_ref(), &get);
                    }
                }
                for t in &p.triggers {
                    t.schedule();
                }
            }
            (p.is_some(), r)
        }
        Kind::Config => {
            let (c, r) = millrace::config::parse_bytes(&seed.path, bytes);
            (c.is_some(), r)
        }
    };
    Checked {
        problems: located(&report, valid),
        valid,
        toml: !report.diagnostics.iter().any(|d| {
            d.message.starts_with("invalid TOML") || d.message.starts_with("invalid UTF-8")
        }),
    }
}

/// What one input gave: the harness's complaints, and how far it got.
struct Checked {
    problems: Vec<String>,
    /// Accepted by the checker.
    valid: bool,
    /// UTF-8 and TOML: it reached the checks behind the parser.
    toml: bool,
}

/// Every error is at a line:col inside the file, and an invalid file has one.
fn located(report: &Report, valid: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let text = &report.source.text;
    let lines: Vec<&str> = text.split('\n').collect();
    if report.diagnostics.len() > millrace::diagnostic::MAX_DIAGNOSTICS + 1 {
        problems.push(format!("{} diagnostics", report.diagnostics.len()));
    }
    if !valid && !report.has_errors() {
        problems.push("rejected without an error".to_string());
    }
    let json = report.to_json();
    for (d, j) in report.diagnostics.iter().zip(&json) {
        let (line, col) = report.source.line_col(d.span.start);
        let in_file = line >= 1
            && line <= lines.len()
            && col >= 1
            && col <= lines[line - 1].chars().count() + 1;
        if !in_file || d.span.start > text.len() || d.span.end < d.span.start {
            problems.push(format!(
                "{:?} at {line}:{col} (span {:?}) is outside the file: {}",
                d.severity, d.span, d.message
            ));
        }
        if j["line"] != line || j["column"] != col {
            problems.push(format!("JSON location {} differs from {line}:{col}", j));
        }
        if d.severity == Severity::Error && d.message.trim().is_empty() {
            problems.push("an error without a message".to_string());
        }
        let head = format!(":{line}:{col}: ");
        let rendered = report.source.render(d);
        // Bounded whatever the file: a clipped message and help, a window of the line.
        if rendered.len() > 8 << 10 {
            problems.push(format!(
                "{} bytes rendered for one diagnostic",
                rendered.len()
            ));
        }
        if !rendered.lines().next().is_some_and(|l| l.contains(&head)) {
            problems.push(format!(
                "`{head}` is not in the rendered report: {rendered}"
            ));
        }
    }
    problems
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Pipeline => "pipeline",
        Kind::Config => "config",
    }
}

/// `millrace validate FILE` (or `validate --config FILE --config-only`) on the
/// input, run in its seed's directory; the problem, if any.
fn through_the_binary(file: &Path, bytes: &[u8], kind: Kind, seed: &Path) -> Option<String> {
    std::fs::write(file, bytes).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_millrace"));
    cmd.current_dir(seed.parent().unwrap_or(Path::new(".")))
        .env("MILLRACE_STATE", file.with_extension("no-such-state"))
        .arg("validate")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    match kind {
        Kind::Pipeline => cmd.arg(file),
        Kind::Config => cmd.arg("--config").arg(file).arg("--config-only"),
    };
    let child = cmd.spawn().expect("run millrace");
    let deadline = Instant::now() + 2 * LIMIT;
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(deadline - Instant::now()) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            // SAFETY: kill(2) on the child spawned above.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            return Some(format!("no exit within {} s", (2 * LIMIT).as_secs()));
        }
    };
    let err = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => None,
        Some(78) if err.contains(": error: ") => None,
        code => Some(format!(
            "exit {code:?}: {}",
            err.chars().take(4000).collect::<String>()
        )),
    }
}

struct Job {
    seed: usize,
    kind: Kind,
    bytes: Vec<u8>,
}

type Outcome = Result<Checked, String>;

/// The checks run on a worker thread with the stack of a tokio worker (2 MiB, where
/// the daemon reloads); the harness waits at most `LIMIT` for each.
const LIMIT: Duration = Duration::from_secs(5);
const STACK: usize = 2 << 20;

fn worker(
    seeds: Arc<Vec<Seed>>,
    env: Arc<Environment>,
) -> (mpsc::Sender<Job>, mpsc::Receiver<Outcome>) {
    let (jobs, rx) = mpsc::channel::<Job>();
    let (tx, outcomes) = mpsc::channel();
    std::thread::Builder::new()
        .name("fuzz-worker".into())
        .stack_size(STACK)
        .spawn(move || {
            for job in rx {
                let seed = &seeds[job.seed];
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    check(seed, job.kind, job.bytes, &env)
                }))
                .map_err(|p| {
                    p.downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into())
                });
                if tx.send(r).is_err() {
                    return;
                }
            }
        })
        .expect("spawn the fuzz worker");
    (jobs, outcomes)
}

#[test]
fn parsers_never_panic_hang_or_lose_the_location() {
    let secs: f64 = std::env::var("MILLRACE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let seed = std::env::var("MILLRACE_FUZZ_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz");
    std::fs::create_dir_all(&dir).unwrap();
    let current_path = dir.join("current.toml");
    let mut current = std::fs::File::create(&current_path).unwrap();
    eprintln!(
        "fuzz: seed {seed:#x} for {secs} s (repeat with MILLRACE_FUZZ_SEED={seed:x}); \
         the input being checked is in {}",
        current_path.display()
    );
    let seeds = Arc::new(seeds());
    let env = Arc::new(environment(&seeds));
    let (jobs, outcomes) = worker(seeds.clone(), env);
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut failures: Vec<String> = Vec::new();
    let mut n: u64 = 0;
    let mut slowest = (Duration::ZERO, 0);
    let (mut toml, mut valid) = (0u64, 0u64);
    while started.elapsed().as_secs_f64() < secs && failures.len() < 10 {
        let (which, bytes) = if n < seeds.len() as u64 {
            // The seeds themselves first: each must pass (or fail) as it does.
            (n as usize, seeds[n as usize].bytes.clone())
        } else {
            mutate(&mut rng, &seeds)
        };
        // Mostly the seed's own parser; sometimes the other one.
        let kind = match (seeds[which].kind, rng.chance(10)) {
            (k, false) => k,
            (Kind::Pipeline, true) => Kind::Config,
            (Kind::Config, true) => Kind::Pipeline,
        };
        // Written before the call: a stack overflow aborts the whole process.
        current.set_len(0).unwrap();
        current.rewind().unwrap();
        current.write_all(&bytes).unwrap();
        let t = Instant::now();
        jobs.send(Job {
            seed: which,
            kind,
            bytes: bytes.clone(),
        })
        .expect("worker alive");
        let outcome = outcomes.recv_timeout(LIMIT);
        let took = t.elapsed();
        if took > slowest.0 {
            slowest = (took, bytes.len());
            // Kept to look at what is slow.
            let _ = std::fs::write(dir.join("slowest.toml"), &bytes);
        }
        if let Ok(Ok(c)) = &outcome {
            toml += u64::from(c.toml);
            valid += u64::from(c.valid);
        }
        let problem = match outcome {
            Ok(Ok(c)) if c.problems.is_empty() => None,
            Ok(Ok(c)) => Some(c.problems.join("; ")),
            Ok(Err(panic)) => Some(format!(
                "panicked: {}",
                panic.chars().take(2000).collect::<String>()
            )),
            Err(_) => Some(format!("no result within {} s", LIMIT.as_secs())),
        };
        if let Some(problem) = problem {
            let file = dir.join(format!("{seed:x}-{n}.toml"));
            std::fs::write(&file, &bytes).unwrap();
            failures.push(format!(
                "input {n} (a mutation of {}, checked as a {kind:?}; saved as {}): {problem}",
                seeds[which].path.display(),
                file.display()
            ));
            if took >= LIMIT {
                // The worker is stuck on it: no further input can be checked.
                break;
            }
        }
        // Now and then the same input through the real binary: `validate` exits 0
        // or 78, never 101, within the limit.
        if n % 1000 == 500 {
            let file = dir.join(format!("cli-{}.toml", kind_name(kind)));
            if let Some(problem) = through_the_binary(&file, &bytes, kind, &seeds[which].path) {
                let saved = dir.join(format!("{seed:x}-{n}.toml"));
                std::fs::write(&saved, &bytes).unwrap();
                failures.push(format!(
                    "input {n} through `millrace validate` (saved as {}): {problem}",
                    saved.display()
                ));
            }
        }
        n += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "fuzz: {n} inputs in {elapsed:.1} s ({:.0}/s; {toml} reached the checks behind the \
         TOML parser, {valid} were accepted), slowest {:?} ({} bytes), {} failures",
        n as f64 / elapsed,
        slowest.0,
        slowest.1,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "seed {seed:#x}:\n{}",
        failures.join("\n")
    );
}
