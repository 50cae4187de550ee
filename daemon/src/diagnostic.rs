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
            message: message.into(),
            help: None,
        }
    }

    pub fn warning(span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            span,
            message: message.into(),
            help: None,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
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
        out += &format!("{line:>gutter$} | {text}\n");
        // The caret covers the span, clipped to the first line.
        let line_end_col = text.chars().count() + 1;
        let (end_line, end_col) = self.line_col(d.span.end);
        let end_col = if end_line == line {
            end_col
        } else {
            line_end_col
        };
        let width = end_col.saturating_sub(col).max(1);
        out += &format!(
            "{:gutter$} | {}{}\n",
            "",
            " ".repeat(col - 1),
            "^".repeat(width)
        );
        if let Some(help) = &d.help {
            out += &format!("{:gutter$} = help: {help}\n", "");
        }
        out
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Paths are printed relative to the working directory when they are below it.
pub fn display_path(path: &Path) -> String {
    if let Ok(cwd) = std::env::current_dir()
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

impl Report {
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

/// The closest candidate by edit distance, for "did you mean" hints.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
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
    fn closest_suggests_near_misses_only() {
        assert_eq!(closest("wasmm", ["wasm", "python"]), Some("wasm"));
        assert_eq!(closest("zzz", ["wasm", "python"]), None);
    }
}
