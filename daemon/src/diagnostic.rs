//! Configuration errors that point at the text: `file:line:col`, the offending line
//! and a caret under the offending span, every error of a file at once.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A byte range in a source file.
pub type Span = Range<usize>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about a configuration file.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub severity: Severity,
    pub span: Span,
    pub message: String,
    /// Extra guidance printed under the caret (`= help: …`).
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            span,
            message: clip(message.into()),
            help: None,
        }
    }

    pub fn warning(span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            span,
            message: clip(message.into()),
            help: None,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(clip(help.into()));
        self
    }
}

/// Characters of a message or help kept at most: they quote the file (a key, a
/// value), which may be a megabyte long.
const MESSAGE_CHARS: usize = 480;

/// A message with its middle elided when it is too long: the start says what is
/// wrong, the end what to do.
fn clip(message: String) -> String {
    let n = message.chars().count();
    if n <= MESSAGE_CHARS {
        return message;
    }
    let head: String = message.chars().take(MESSAGE_CHARS * 2 / 3).collect();
    let tail: String = message.chars().skip(n - MESSAGE_CHARS / 3).collect();
    format!("{head} … {tail}")
}

/// A configuration file's text, kept to render diagnostics against it.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
    line_starts: Vec<usize>,
}

impl SourceFile {
    pub fn new(path: impl Into<PathBuf>, text: String) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        SourceFile {
            path: path.into(),
            text,
            line_starts,
        }
    }

    /// A configuration file's bytes as text. Bytes that are not UTF-8 are an error
    /// at the line and column of the first invalid one (rendered against the text
    /// with U+FFFD in its place), like any other mistake in the file.
    pub fn decode(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<SourceFile, Report> {
        match String::from_utf8(bytes) {
            Ok(text) => Ok(SourceFile::new(path, text)),
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                let byte = e.as_bytes()[at];
                let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
                let message = match e.utf8_error().error_len() {
                    Some(_) => {
                        format!("invalid UTF-8: byte 0x{byte:02X} is not part of a valid character")
                    }
                    None => format!(
                        "invalid UTF-8: the file ends inside a character (byte 0x{byte:02X})"
                    ),
                };
                Err(Report {
                    source: SourceFile::new(path, text),
                    diagnostics: vec![
                        Diagnostic::error(at..at + '\u{FFFD}'.len_utf8(), message).with_help(
                            "configuration files are UTF-8 text: save this one as UTF-8",
                        ),
                    ],
                })
            }
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let start = self.line_starts[line];
        let col = self.text[start..floor_char_boundary(&self.text, offset)]
            .chars()
            .count()
            + 1;
        (line + 1, col)
    }

    fn line_text(&self, line: usize) -> &str {
        let start = self.line_starts[line - 1];
        let end = self
            .line_starts
            .get(line)
            .copied()
            .unwrap_or(self.text.len());
        self.text[start..end].trim_end_matches(['\n', '\r'])
    }

    /// Renders one diagnostic:
    ///
    /// ```text
    /// pipelines/x.toml:4:1: error: unknown key `wasmm` in step "prepare"
    ///     4 | wasmm = "x.wasm"
    ///       | ^^^^^
    ///       = help: expected one of: name, wasm, …
    /// ```
    pub fn render(&self, d: &Diagnostic) -> String {
        let (line, col) = self.line_col(d.span.start);
        let kind = match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let text = self.line_text(line);
        let gutter = line.to_string().len().max(4);
        let mut out = format!(
            "{}:{line}:{col}: {kind}: {}\n",
            display_path(&self.path),
            d.message
        );
        // The caret covers the span, clipped to the first line. `col` counts
        // characters; the caret line counts terminal cells, so it lines up under
        // wide (CJK), combining and tab characters too. A long line is shown as a
        // window around the caret.
        let chars: Vec<char> = text.chars().collect();
        let n = chars.len();
        let (end_line, end_col) = self.line_col(d.span.end);
        let first = (col - 1).min(n);
        let last = if end_line == line { end_col - 1 } else { n }.clamp(first, n);
        let (from, to) = if n <= SHOWN_CHARS {
            (0, n)
        } else {
            let from = first.saturating_sub(SHOWN_CHARS / 4).min(n - SHOWN_CHARS);
            (from, from + SHOWN_CHARS)
        };
        let (open, close) = (
            if from > 0 { "…" } else { "" },
            if to < n { "…" } else { "" },
        );
        let shown: String = chars[from..to].iter().map(|&c| shown_char(c)).collect();
        out += &format!("{line:>gutter$} | {open}{shown}{close}\n");
        let pad: String = std::iter::repeat_n(" ", open.len().min(1))
            .chain(chars[from..first.min(to)].iter().map(|&c| match c {
                '\t' => "\t",
                c if cell_width(c) == 2 => "  ",
                c if cell_width(c) == 0 => "",
                _ => " ",
            }))
            .collect();
        let width: usize = chars[first.min(to)..last.min(to)]
            .iter()
            .map(|&c| if c == '\t' { 1 } else { cell_width(c) })
            .sum();
        out += &format!("{:gutter$} | {pad}{}\n", "", "^".repeat(width.max(1)));
        if let Some(help) = &d.help {
            out += &format!("{:gutter$} = help: {help}\n", "");
        }
        out
    }
}

/// Characters of a source line shown at most (the rest is elided around the
/// caret): a megabyte-long line is not printed once per diagnostic.
const SHOWN_CHARS: usize = 200;

/// A source line's character as printed: control characters (a stray `\r`, an
/// escape sequence in invalid TOML) become U+FFFD, so the terminal shows the
/// line as it is and nothing in the file can move the cursor. One character
/// each, so the caret still lines up.
fn shown_char(c: char) -> char {
    if c.is_control() && c != '\t' {
        '\u{FFFD}'
    } else {
        c
    }
}

/// Terminal cells of one printed character (a control character prints as one
/// U+FFFD).
fn cell_width(c: char) -> usize {
    if c.is_control() {
        1
    } else {
        unicode_width::UnicodeWidthChar::width(c).unwrap_or(1)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Paths are printed relative to the working directory when they are below it,
/// except under `/` (a service's working directory), where a relative path would
/// only lose its leading slash.
pub fn display_path(path: &Path) -> String {
    if let Ok(cwd) = std::env::current_dir()
        && cwd.parent().is_some()
        && let Ok(rel) = path.strip_prefix(&cwd)
    {
        return rel.display().to_string();
    }
    path.display().to_string()
}

/// Every diagnostic of one file, in file order; an error if any of them is an error.
#[derive(Debug, Clone)]
pub struct Report {
    pub source: SourceFile,
    pub diagnostics: Vec<Diagnostic>,
}

/// Diagnostics a report keeps at most: a file with a thousand mistakes (an
/// unclosed table nested a thousand deep) reports its first ones, and a note.
pub const MAX_DIAGNOSTICS: usize = 100;

impl Report {
    /// The diagnostics in file order, each reported once, at most
    /// [`MAX_DIAGNOSTICS`] of them and then a note of how many more there are.
    pub fn new(source: SourceFile, mut diagnostics: Vec<Diagnostic>) -> Report {
        diagnostics.sort_by_key(|d| (d.span.start, d.severity));
        diagnostics.dedup_by(|a, b| {
            a.span == b.span && a.severity == b.severity && a.message == b.message
        });
        if diagnostics.len() > MAX_DIAGNOSTICS {
            let rest = diagnostics.split_off(MAX_DIAGNOSTICS);
            let errors = rest
                .iter()
                .filter(|d| d.severity == Severity::Error)
                .count();
            let note = format!(
                "{} more diagnostic{} ({errors} error{}) after this point are not shown",
                rest.len(),
                if rest.len() == 1 { "" } else { "s" },
                if errors == 1 { "" } else { "s" },
            );
            let severity = if errors > 0 {
                Severity::Error
            } else {
                Severity::Warning
            };
            diagnostics.push(Diagnostic {
                severity,
                span: rest[0].span.clone(),
                message: note,
                help: Some(format!(
                    "a file shows its first {MAX_DIAGNOSTICS}: fix those first"
                )),
            });
        }
        Report {
            source,
            diagnostics,
        }
    }

    pub fn has_errors(&self) -> bool {
        self.diagnostics
            .iter()
            .any(|d| d.severity == Severity::Error)
    }

    pub fn error_count(&self) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count()
    }

    /// Structured form for `--json` and the API.
    pub fn to_json(&self) -> Vec<serde_json::Value> {
        self.diagnostics
            .iter()
            .map(|d| {
                let (line, column) = self.source.line_col(d.span.start);
                serde_json::json!({
                    "file": display_path(&self.source.path),
                    "line": line,
                    "column": column,
                    "severity": match d.severity { Severity::Error => "error", Severity::Warning => "warning" },
                    "message": d.message,
                    "help": d.help,
                })
            })
            .collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.diagnostics {
            f.write_str(&self.source.render(d))?;
        }
        Ok(())
    }
}

thread_local! {
    /// Character comparisons left for "did you mean" hints while checking one file.
    static HINT_BUDGET: std::cell::Cell<u64> = const { std::cell::Cell::new(HINT_BUDGET_PER_FILE) };
}

/// About 10 ms of edit distances per file (release build): 4000 unknown names against 4000
/// declared ones would otherwise take 20 s (a crafted file must not hold up a
/// reload); past the budget, errors come without a hint.
const HINT_BUDGET_PER_FILE: u64 = 5_000_000;

/// Gives the next file checked on this thread its full budget of hints.
pub fn reset_hint_budget() {
    HINT_BUDGET.with(|b| b.set(HINT_BUDGET_PER_FILE));
}

/// The closest candidate by edit distance, for "did you mean" hints.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    // The distance is at least the difference in length: a word far longer than
    // every candidate (a megabyte-long key) is no near miss, and is not compared
    // character by character with each of them.
    let len = word.chars().count();
    let spend = |cost: u64| {
        HINT_BUDGET.with(|b| {
            let left = b.get();
            b.set(left.saturating_sub(cost));
            left >= cost
        })
    };
    candidates
        .into_iter()
        // Looking at a candidate costs too: an exhausted budget stops the scan.
        .take_while(|c| spend(c.len() as u64 + 1))
        .filter(|c| {
            let n = c.chars().count();
            len.abs_diff(n) <= (n.max(len) / 3).max(1)
        })
        .filter(|c| spend((len as u64 + 1) * (c.chars().count() as u64 + 1)))
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters_from_one() {
        let s = SourceFile::new("x.toml", "a = 1\nbé = \"x\"\n".into());
        assert_eq!(s.line_col(0), (1, 1));
        assert_eq!(s.line_col(6), (2, 1));
        assert_eq!(s.line_col(10), (2, 4));
    }

    #[test]
    fn caret_underlines_the_span() {
        let s = SourceFile::new("/nowhere/x.toml", "name = \"Bad Name\"\n".into());
        let out = s.render(&Diagnostic::error(7..17, "bad name"));
        assert!(
            out.starts_with("/nowhere/x.toml:1:8: error: bad name\n"),
            "{out}"
        );
        assert!(out.ends_with("     |        ^^^^^^^^^^\n"), "{out}");
    }

    #[test]
    fn the_caret_lines_up_under_wide_combining_and_tab_characters() {
        let s = SourceFile::new(
            "/nowhere/x.toml",
            "a = [\"日本\", \"e\u{301}\", \"x\"]\n\tb = 1\n".into(),
        );
        let at = s.text.find("\"x\"").unwrap();
        let out = s.render(&Diagnostic::error(at..at + 3, "here"));
        // Column 18 in characters (the accent is one), 18 cells before the caret.
        assert!(
            out.starts_with("/nowhere/x.toml:1:18: error: here\n"),
            "{out}"
        );
        // `a = [` 5, `"日本"` 6 cells, `, ` 2, `"é"` 3 (the accent takes none), `, ` 2.
        assert!(
            out.ends_with(&format!("     | {}^^^\n", " ".repeat(18))),
            "{out}"
        );
        let at = s.text.find('b').unwrap();
        let out = s.render(&Diagnostic::error(at..at + 1, "tab"));
        assert!(out.contains(":2:2: error: tab\n"), "{out}");
        assert!(out.ends_with("     | \t^\n"), "{out}");
    }

    #[test]
    fn control_characters_and_long_lines_are_shown_safely() {
        let line = format!("k = \"\u{1b}[31m{}\"", "x".repeat(10_000));
        let s = SourceFile::new("/nowhere/x.toml", line.clone());
        let at = line.len() - 1;
        let out = s.render(&Diagnostic::error(at..at + 1, "end"));
        assert!(!out.contains('\u{1b}'), "{out}");
        let shown = out.lines().nth(1).unwrap();
        assert!(shown.chars().count() < 250, "{shown}");
        assert!(shown.starts_with("   1 | …x"), "{shown}");
        let caret = out.lines().nth(2).unwrap();
        let quote = shown.chars().position(|c| c == '"').unwrap();
        assert_eq!(caret.chars().position(|c| c == '^'), Some(quote), "{out}");
        let message = format!(
            "unknown key `{}`: did you mean `name`?",
            "k".repeat(100_000)
        );
        let d = Diagnostic::error(0..1, message);
        assert!(d.message.chars().count() < 500, "{}", d.message);
        assert!(d.message.ends_with("did you mean `name`?"), "{}", d.message);
    }

    #[test]
    fn invalid_utf8_is_located_at_its_first_bad_byte() {
        let r = SourceFile::decode("/nowhere/x.toml", b"a = 1\nb = \"caf\xe9\"\n".to_vec())
            .unwrap_err();
        let out = r.to_string();
        assert!(
            out.starts_with("/nowhere/x.toml:2:9: error: invalid UTF-8: byte 0xE9"),
            "{out}"
        );
        assert!(
            out.contains("   2 | b = \"caf\u{FFFD}\"\n     |         ^\n"),
            "{out}"
        );
        let r = SourceFile::decode("/nowhere/x.toml", b"a = \"\xe6\x97".to_vec()).unwrap_err();
        assert!(
            r.to_string()
                .contains(":1:6: error: invalid UTF-8: the file ends inside a character")
        );
    }

    #[test]
    fn a_report_keeps_its_first_hundred_diagnostics_once_each() {
        let s = SourceFile::new("/nowhere/x.toml", "x\n".repeat(500));
        let mut ds: Vec<Diagnostic> = (0..300)
            .map(|i| Diagnostic::error(i * 2..i * 2 + 1, "bad"))
            .collect();
        ds.extend((0..50).map(|_| Diagnostic::error(0..1, "bad")));
        let r = Report::new(s, ds);
        assert_eq!(r.diagnostics.len(), MAX_DIAGNOSTICS + 1);
        assert_eq!(r.diagnostics[0].span, 0..1);
        assert_eq!(r.diagnostics[1].span, 2..3);
        let note = &r.diagnostics[MAX_DIAGNOSTICS];
        assert_eq!(
            note.message,
            "200 more diagnostics (200 errors) after this point are not shown"
        );
        assert_eq!(note.span, 200..201);
    }

    #[test]
    fn closest_suggests_near_misses_only() {
        assert_eq!(closest("wasmm", ["wasm", "python"]), Some("wasm"));
        assert_eq!(closest("zzz", ["wasm", "python"]), None);
        assert_eq!(closest(&"w".repeat(1 << 20), ["wasm", "python"]), None);
    }
}
