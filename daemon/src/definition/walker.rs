//! The walk over a spanned TOML document: each typed value read with a located
//! error when it is not what was expected (shared with the daemon config).

use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{MAX_TIMER, Sp, parse_duration, parse_size};
use crate::diagnostic::{Diagnostic, Span, closest};

pub(crate) type Value<'i> = Spanned<DeValue<'i>>;

/// Walks a spanned TOML document, collecting every diagnostic (also used for the
/// daemon config).
pub(crate) struct Walker {
    pub(crate) diags: Vec<Diagnostic>,
}

impl Walker {
    pub(crate) fn error(&mut self, span: Span, message: impl Into<String>) {
        self.diags.push(Diagnostic::error(span, message));
    }

    pub(crate) fn unknown_keys(&mut self, t: &DeTable<'_>, known: &[&str], context: &str) {
        for k in t.keys() {
            if !known.contains(&k.get_ref().as_ref()) {
                let mut d = Diagnostic::error(
                    k.span(),
                    format!("unknown key `{}` in {context}", k.get_ref()),
                );
                d = match closest(k.get_ref(), known.iter().copied()) {
                    Some(c) => d.with_help(format!("did you mean `{c}`?")),
                    None => d.with_help(format!("expected one of: {}", known.join(", "))),
                };
                self.diags.push(d);
            }
        }
    }

    pub(crate) fn wrong_type(&mut self, v: &Value<'_>, what: &str, expected: &str) {
        self.error(
            v.span(),
            format!("{what} must be {expected}, not {}", v.get_ref().type_str()),
        );
    }

    pub(crate) fn table<'a, 'i>(
        &mut self,
        v: &'a Value<'i>,
        what: &str,
    ) -> Option<&'a DeTable<'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => {
                self.wrong_type(v, what, "a table");
                None
            }
        }
    }

    pub(super) fn array_of_tables<'a, 'i>(
        &mut self,
        v: &'a Value<'i>,
        what: &str,
    ) -> Vec<&'a Value<'i>> {
        match v.get_ref() {
            DeValue::Array(a) => a.iter().collect(),
            _ => {
                self.error(
                    v.span(),
                    format!("`{what}` must be written as [[{what}]] tables"),
                );
                Vec::new()
            }
        }
    }

    pub(crate) fn string(&mut self, v: &Value<'_>, what: &str) -> Option<Sp<String>> {
        match v.get_ref() {
            // No argument, variable or path can hold a NUL: it would be cut where
            // the step sees it while the cache key kept it.
            DeValue::String(s) if s.contains('\0') => {
                self.error(
                    v.span(),
                    format!("{what}: the text holds a NUL character (\\u0000), which no argument, variable or path can carry"),
                );
                None
            }
            DeValue::String(s) => Some(Spanned::new(v.span(), s.to_string())),
            _ => {
                self.wrong_type(v, what, "a string");
                None
            }
        }
    }

    pub(crate) fn integer(&mut self, v: &Value<'_>, what: &str) -> Option<i64> {
        match v.get_ref() {
            DeValue::Integer(i) => {
                match i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()) {
                    Ok(n) => Some(n),
                    Err(_) => {
                        self.error(v.span(), format!("{what}: integer out of range"));
                        None
                    }
                }
            }
            _ => {
                self.wrong_type(v, what, "an integer");
                None
            }
        }
    }

    pub(crate) fn boolean(&mut self, v: &Value<'_>, what: &str) -> Option<bool> {
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(v, what, "true or false");
                None
            }
        }
    }

    pub(crate) fn string_array(&mut self, v: &Value<'_>, what: &str) -> Vec<Sp<String>> {
        match v.get_ref() {
            DeValue::Array(a) => a
                .iter()
                .filter_map(|e| self.string(e, &format!("each of {what}")))
                .collect(),
            _ => {
                self.wrong_type(v, what, "an array of strings");
                Vec::new()
            }
        }
    }

    pub(super) fn string_table(
        &mut self,
        v: &Value<'_>,
        what: &str,
    ) -> Vec<(Sp<String>, Sp<String>)> {
        let Some(t) = self.table(v, what) else {
            return Vec::new();
        };
        t.iter()
            .filter_map(|(k, v)| {
                let value = self.string(v, &format!("{what}.{}", k.get_ref()))?;
                Some((Spanned::new(k.span(), k.get_ref().to_string()), value))
            })
            .collect()
    }

    pub(crate) fn duration(&mut self, v: &Value<'_>, what: &str) -> Option<Duration> {
        let s = self.string(v, what)?;
        match parse_duration(s.get_ref()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.diags.push(
                    Diagnostic::error(
                        s.span(),
                        format!("{what}: bad duration `{}`: {e}", s.get_ref()),
                    )
                    .with_help(
                        "durations look like \"90s\", \"30m\", \"2h\", \"1h 30m\", \"500ms\"",
                    ),
                );
                None
            }
        }
    }

    /// A duration a timer adds to the clock (a debounce, a backoff, a grace
    /// period): at most a year, since a longer one overflows `Instant` arithmetic.
    pub(crate) fn timer_duration(&mut self, v: &Value<'_>, what: &str) -> Option<Duration> {
        let d = self.duration(v, what)?;
        if d > MAX_TIMER {
            self.error(v.span(), format!("{what} must be at most a year"));
            return None;
        }
        Some(d)
    }

    pub(crate) fn size(&mut self, v: &Value<'_>, what: &str) -> Option<u64> {
        let s = self.string(v, what)?;
        match parse_size(s.get_ref()) {
            Ok(n) => Some(n),
            Err(e) => {
                self.diags.push(
                    Diagnostic::error(s.span(), format!("{what}: bad size `{}`: {e}", s.get_ref()))
                        .with_help("sizes look like \"512MiB\", \"2GiB\", \"100MB\""),
                );
                None
            }
        }
    }

    pub(super) fn name(&mut self, n: &Sp<String>, what: &str, rule: NameRule) {
        if !valid_name(n.get_ref(), rule) {
            let rule_text = match rule {
                NameRule::Pipeline => {
                    "lowercase letters, digits and `-`, starting with a letter or digit"
                }
                NameRule::Identifier => {
                    "lowercase letters, digits, `_` and `-`, starting with a letter"
                }
            };
            self.error(
                n.span(),
                format!(
                    "bad {what} `{}`: use {rule_text}, at most 63 characters",
                    n.get_ref()
                ),
            );
        }
    }
}

#[derive(Clone, Copy)]
pub(super) enum NameRule {
    /// `[a-z0-9][a-z0-9-]*`: pipelines and experiments.
    Pipeline,
    /// `[a-z][a-z0-9_-]*`: steps, outputs, inputs, params, mounts.
    Identifier,
}

/// A step-like name (`[a-z][a-z0-9_-]*`): also a secret's, which becomes a file name.
pub(crate) fn is_identifier(s: &str) -> bool {
    valid_name(s, NameRule::Identifier)
}

pub(super) fn valid_name(s: &str, rule: NameRule) -> bool {
    let mut chars = s.chars();
    let first_ok = match (chars.next(), rule) {
        (Some(c), NameRule::Pipeline) => c.is_ascii_lowercase() || c.is_ascii_digit(),
        (Some(c), NameRule::Identifier) => c.is_ascii_lowercase(),
        (None, _) => false,
    };
    first_ok
        && s.len() <= 63
        && chars.all(|c| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || c == '-'
                || (c == '_' && matches!(rule, NameRule::Identifier))
        })
}

pub(crate) fn valid_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Where bytes `part` of a string value are in the file: exactly there when the
/// value is written as it reads (one-line quotes, no escapes), else the whole
/// string: an escape (`\u00e9`, `\"`) or a multi-line string shifts every offset
/// after it.
pub(super) fn value_span(text: &str, s: &Sp<String>, part: Span) -> Span {
    let span = s.span();
    let raw = text.get(span.clone()).unwrap_or_default();
    let quoted = raw.len() >= 2
        && (raw.starts_with('"') && raw.ends_with('"')
            || raw.starts_with('\'') && raw.ends_with('\''));
    if quoted && raw.get(1..raw.len() - 1) == Some(s.get_ref().as_str()) {
        span.start + 1 + part.start..span.start + 1 + part.end
    } else {
        span
    }
}

pub(super) fn declared_list(what: &str, names: &[&str]) -> String {
    if names.is_empty() {
        format!("no {what} are declared")
    } else {
        format!("declared {what}: {}", names.join(", "))
    }
}
