//! The string forms inside a pipeline's values: data references, `${params.NAME}`
//! interpolation, durations and sizes.

use std::time::Duration;

use super::walker::{declared_list, value_span};
use super::{IN_DIR, OUT_DIR, Param, Reference, Sp, Walker};
use crate::diagnostic::{Diagnostic, closest};

/// What a string's `${inputs.NAME}` and `${outputs.NAME}` may name: a step's
/// mounts and declared outputs in its `args`, `env` and container settings;
/// nothing in a path (an input's `path`, a transfer's `to`, a watch glob), which
/// is resolved on the host before any sandbox exists.
#[derive(Clone, Copy)]
pub(super) enum Mounts<'a> {
    Step {
        inputs: &'a [&'a str],
        outputs: &'a [&'a str],
    },
    Path,
}

impl Walker {
    /// Checks every `${…}` in a string: `${params.NAME}` of declared params, and
    /// where `mounts` allows, `${inputs.MOUNT}` and `${outputs.NAME}` of the step.
    pub(super) fn interpolation(
        &mut self,
        s: &Sp<String>,
        text: &str,
        params: &[Param],
        mounts: Mounts<'_>,
    ) {
        for piece in interpolation_pieces(s.get_ref()) {
            match piece {
                Piece::Literal(_) => {}
                Piece::Param { name, at } => {
                    if !params.iter().any(|p| p.name.get_ref() == name) {
                        let known: Vec<&str> =
                            params.iter().map(|p| p.name.get_ref().as_str()).collect();
                        let mut d = Diagnostic::error(
                            value_span(text, s, at..at + name.len() + 10),
                            format!("unknown param `{name}` in `${{params.{name}}}`"),
                        );
                        d = match closest(name, known.iter().copied()) {
                            Some(c) => d.with_help(format!(
                                "did you mean `{c}`? {}",
                                declared_list("params", &known)
                            )),
                            None => d.with_help(declared_list("params", &known)),
                        };
                        self.diags.push(d);
                    }
                }
                Piece::Input { name, at } | Piece::Output { name, at } => {
                    let (what, len) = match piece {
                        Piece::Input { .. } => ("inputs", name.len() + 10),
                        _ => ("outputs", name.len() + 11),
                    };
                    let span = value_span(text, s, at..at + len);
                    let Mounts::Step { inputs, outputs } = mounts else {
                        self.diags.push(
                            Diagnostic::error(
                                span,
                                format!("`${{{what}.{name}}}` in a path: a path is resolved on the host, where no sandbox exists"),
                            )
                            .with_help("only `${params.NAME}` is expanded in a path"),
                        );
                        continue;
                    };
                    let (known, kind) = if what == "inputs" {
                        (inputs, "input mounts of this step")
                    } else {
                        (outputs, "outputs of this step")
                    };
                    if !known.contains(&name) {
                        let mut d = Diagnostic::error(
                            span,
                            format!(
                                "unknown {} `{name}` in `${{{what}.{name}}}`",
                                &what[..what.len() - 1]
                            ),
                        );
                        d = match closest(name, known.iter().copied()) {
                            Some(c) => d.with_help(format!(
                                "did you mean `{c}`? {}",
                                declared_list(kind, known)
                            )),
                            None => d.with_help(declared_list(kind, known)),
                        };
                        self.diags.push(d);
                    }
                }
                Piece::Bad { text: bad, at } => {
                    self.diags.push(
                        Diagnostic::error(
                            value_span(text, s, at..at + bad.len()),
                            format!("bad interpolation `{bad}`"),
                        )
                        .with_help("write `${params.NAME}`, `${inputs.MOUNT}` or `${outputs.NAME}`; a literal `$` followed by `{` is written `$${`"),
                    );
                }
            }
        }
    }
}

/// `inputs.NAME` or `STEP.OUTPUT`.
pub fn parse_reference(s: &str) -> Option<Reference> {
    let (a, b) = s.split_once('.')?;
    if a.is_empty() || b.is_empty() || b.contains('.') {
        return None;
    }
    Some(if a == "inputs" {
        Reference::Input(b.into())
    } else {
        Reference::Output {
            step: a.into(),
            output: b.into(),
        }
    })
}

/// One piece of a string with `${params.NAME}`, `${inputs.MOUNT}` and
/// `${outputs.NAME}` interpolations.
#[derive(Debug, PartialEq)]
pub enum Piece<'a> {
    Literal(&'a str),
    /// `at` is the byte offset of the `$`.
    Param {
        name: &'a str,
        at: usize,
    },
    /// A step's input mount: expands to `/in/MOUNT`.
    Input {
        name: &'a str,
        at: usize,
    },
    /// A step's output: expands to `/out/NAME`.
    Output {
        name: &'a str,
        at: usize,
    },
    Bad {
        text: &'a str,
        at: usize,
    },
}

/// Splits a string into literals and `${params.NAME}` (`${inputs.MOUNT}`,
/// `${outputs.NAME}`) references; `$${` is a literal `${`.
/// Offsets are bytes of `s`, always at character boundaries: the scan moves from
/// one `$` to the next (an ASCII byte), never into a multi-byte character.
pub fn interpolation_pieces(s: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = 0;
    let mut from = 0;
    while let Some(found) = s[from..].find('$') {
        let i = from + found;
        let tail = &s[i..];
        if tail.starts_with("$${") {
            if rest < i {
                out.push(Piece::Literal(&s[rest..i]));
            }
            out.push(Piece::Literal("${"));
            rest = i + 3;
            from = rest;
        } else if tail.starts_with("${") {
            if rest < i {
                out.push(Piece::Literal(&s[rest..i]));
            }
            match tail.find('}') {
                Some(end) => {
                    let inner = &tail[2..end];
                    let named = |prefix: &str| inner.strip_prefix(prefix).filter(|n| !n.is_empty());
                    if let Some(name) = named("params.") {
                        out.push(Piece::Param { name, at: i })
                    } else if let Some(name) = named("inputs.") {
                        out.push(Piece::Input { name, at: i })
                    } else if let Some(name) = named("outputs.") {
                        out.push(Piece::Output { name, at: i })
                    } else {
                        out.push(Piece::Bad {
                            text: &tail[..=end],
                            at: i,
                        })
                    }
                    rest = i + end + 1;
                }
                None => {
                    out.push(Piece::Bad { text: tail, at: i });
                    rest = s.len();
                }
            }
            from = rest;
        } else {
            from = i + 1;
        }
    }
    if rest < s.len() {
        out.push(Piece::Literal(&s[rest..]));
    }
    out
}

/// Expands `${params.NAME}` by `params`, and `${inputs.MOUNT}` and
/// `${outputs.NAME}` to the paths the sandbox mounts them at ([`IN_DIR`],
/// [`OUT_DIR`]); names were checked by validation.
pub fn interpolate(s: &str, params: &dyn Fn(&str) -> Option<String>) -> String {
    interpolation_pieces(s)
        .into_iter()
        .map(|p| match p {
            Piece::Literal(l) => l.to_string(),
            Piece::Param { name, .. } => params(name).unwrap_or_default(),
            Piece::Input { name, .. } => format!("{IN_DIR}/{name}"),
            Piece::Output { name, .. } => format!("{OUT_DIR}/{name}"),
            Piece::Bad { text, .. } => text.to_string(),
        })
        .collect()
}

/// `"90s"`, `"30m"`, `"2h"`, `"1h 30m"`, `"500ms"`, `"1d"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| e.to_string())
}

/// `"512MiB"`, `"2GiB"`, `"100MB"`, `"4096"` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| "expected a number followed by a unit".to_string())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "MB" => 1000_u64.pow(2),
        "GB" => 1000_u64.pow(3),
        "TB" => 1000_u64.pow(4),
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit `{other}` (use B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    let bytes = num * mult as f64;
    if bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err("size out of range".into());
    }
    Ok(bytes as u64)
}

pub fn format_size(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if n >= size && n.is_multiple_of(size) {
            return format!("{}{unit}", n / size);
        }
    }
    format!("{n}B")
}
