//! Colour on stderr, as clap colours its own errors: `error:` in bold red and
//! `warning:` in bold yellow at the start of a line, only on a terminal and
//! only without `NO_COLOR` (<https://no-color.org>: set and not empty turns it
//! off) or `TERM=dumb`. Everything piped or logged stays plain text.

use std::io::IsTerminal;

const RED: &str = "\u{1b}[1;31m";
const YELLOW: &str = "\u{1b}[1;33m";
const RESET: &str = "\u{1b}[0m";

/// Whether stderr gets colour.
pub(super) fn stderr_colour() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
    !no_color && !dumb && std::io::stderr().is_terminal()
}

/// `text` with each line's leading `error:` / `warning:` coloured when `colour`.
/// The rest of a line (a message may quote a user's text) is left as it is.
pub(super) fn paint(text: &str, colour: bool) -> String {
    if !colour {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let coloured = [("error:", RED), ("warning:", YELLOW)]
            .into_iter()
            .find_map(|(word, code)| {
                line.strip_prefix(word)
                    .map(|rest| format!("{code}{}{RESET}:{rest}", &word[..word.len() - 1]))
            });
        out.push_str(coloured.as_deref().unwrap_or(line));
    }
    out
}

/// Prints `text` (its lines starting `error:` or `warning:`) on stderr, coloured
/// where [`stderr_colour`] allows.
pub(super) fn eprint_lines(text: &str) {
    eprintln!("{}", paint(text, stderr_colour()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_leading_error_or_warning_is_coloured_and_only_when_asked() {
        let text = "error: run 9 not found\nwarning: x\n  a.toml:1:1: error: quoted";
        assert_eq!(paint(text, false), text);
        assert_eq!(
            paint(text, true),
            "\u{1b}[1;31merror\u{1b}[0m: run 9 not found\n\u{1b}[1;33mwarning\u{1b}[0m: x\n  a.toml:1:1: error: quoted"
        );
    }
}
