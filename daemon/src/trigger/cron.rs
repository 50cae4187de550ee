//! Cron schedules: croner for the calendar maths, chrono-tz for IANA zones.
//!
//! Firings are computed in the trigger's zone, so they follow its DST rules: a
//! wall-clock time that does not exist (spring forward) fires once, at the first
//! instant after the gap; one that happens twice (fall back) fires once, at the
//! first occurrence. Patterns that fire every hour or more often keep firing on
//! every real instant they match.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// Most firings a catchup or simulation lists; beyond it the rest are counted.
pub const MAX_FIRINGS: usize = 10_000;

#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    pub tz: Tz,
    pub expr: String,
}

/// Why a cron trigger does not parse, by the key at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleError {
    Expr(String),
    Timezone(String),
}

impl Schedule {
    /// Parses a 5-field expression (or 6 with seconds first) in zone `tz` (default
    /// UTC).
    pub fn parse(expr: &str, tz: Option<&str>) -> Result<Schedule, ScheduleError> {
        let fields = expr.split_whitespace().count();
        if fields != 5 && fields != 6 {
            return Err(ScheduleError::Expr(format!(
                "a cron expression has 5 fields (or 6 with seconds first), this one has {fields}"
            )));
        }
        if let Some(e) = out_of_range(expr) {
            return Err(ScheduleError::Expr(format!(
                "bad cron expression `{expr}`: {e}"
            )));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expr)
            .map_err(|e| ScheduleError::Expr(format!("bad cron expression `{expr}`: {e}")))?;
        let tz = match tz {
            None => Tz::UTC,
            Some(name) => Tz::from_str(name).map_err(|_| {
                let hint = crate::diagnostic::closest(
                    name,
                    chrono_tz::TZ_VARIANTS.iter().map(|z| z.name()),
                )
                .map(|c| format!("; did you mean \"{c}\"?"))
                .unwrap_or_default();
                ScheduleError::Timezone(format!(
                    "unknown time zone `{name}`: expected an IANA name like \"Europe/Stockholm\" or \"UTC\"{hint}"
                ))
            })?,
        };
        Ok(Schedule {
            cron,
            tz,
            expr: expr.to_string(),
        })
    }

    /// The first firing strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// Firings in `(from, to]`, at most `limit`; the second value counts them all
    /// (up to [`MAX_FIRINGS`] more).
    pub fn between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: usize,
    ) -> (Vec<DateTime<Tz>>, usize) {
        let mut out = Vec::new();
        let mut count = 0;
        let mut t = from;
        while let Some(next) = self.next_after(t) {
            if next > to || count >= limit + MAX_FIRINGS {
                break;
            }
            if out.len() < limit {
                out.push(next.with_timezone(&self.tz));
            }
            count += 1;
            t = next;
        }
        (out, count)
    }

    /// `t` in the schedule's zone, for display.
    pub fn local(&self, t: DateTime<Utc>) -> DateTime<Tz> {
        self.tz.from_utc_datetime(&t.naive_utc())
    }
}

/// Names the field and value of a plain number out of its range (croner's own
/// message does not say which).
fn out_of_range(expr: &str) -> Option<String> {
    const FIELDS: [(&str, u32, u32); 6] = [
        ("second", 0, 59),
        ("minute", 0, 59),
        ("hour", 0, 23),
        ("day of month", 1, 31),
        ("month", 1, 12),
        ("day of week", 0, 7),
    ];
    let parts: Vec<&str> = expr.split_whitespace().collect();
    let fields = if parts.len() == 6 {
        &FIELDS[..]
    } else {
        &FIELDS[1..]
    };
    for (part, (name, lo, hi)) in parts.iter().zip(fields) {
        for item in part.split(',') {
            let range = item.split('/').next().unwrap_or("");
            for n in range.split('-') {
                if let Ok(v) = n.parse::<u32>()
                    && !(*lo..=*hi).contains(&v)
                {
                    return Some(format!("{name} {v} is out of range ({lo}-{hi})"));
                }
            }
        }
    }
    None
}

pub fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&Utc))
            .expect("a valid instant")
    }

    fn firings(expr: &str, tz: &str, from: &str, to: &str) -> Vec<String> {
        let s = Schedule::parse(expr, Some(tz)).expect("a valid schedule");
        s.between(at(from), at(to), 100)
            .0
            .iter()
            .map(|d| d.to_rfc3339())
            .collect()
    }

    #[test]
    fn stockholm_spring_forward_fires_once_after_the_gap() {
        assert_eq!(
            firings(
                "30 2 * * *",
                "Europe/Stockholm",
                "2026-03-28T00:00:00Z",
                "2026-03-31T00:00:00Z"
            ),
            [
                "2026-03-28T02:30:00+01:00",
                "2026-03-29T03:00:00+02:00",
                "2026-03-30T02:30:00+02:00"
            ]
        );
    }

    #[test]
    fn stockholm_fall_back_fires_an_ambiguous_time_once() {
        assert_eq!(
            firings(
                "30 2 * * *",
                "Europe/Stockholm",
                "2026-10-24T00:00:00Z",
                "2026-10-27T00:00:00Z"
            ),
            [
                "2026-10-24T02:30:00+02:00",
                "2026-10-25T02:30:00+02:00",
                "2026-10-26T02:30:00+01:00"
            ]
        );
    }

    #[test]
    fn six_fields_have_seconds_first_and_zones_are_checked() {
        let s = Schedule::parse("*/1 * * * * *", None).expect("valid");
        let t = at("2026-01-01T00:00:00Z");
        assert_eq!(s.next_after(t), Some(at("2026-01-01T00:00:01Z")));
        assert!(matches!(
            Schedule::parse("0 3 * * *", Some("Mars/Olympus")),
            Err(ScheduleError::Timezone(_))
        ));
        assert!(matches!(
            Schedule::parse("0 25 * * *", None),
            Err(ScheduleError::Expr(_))
        ));
        assert!(matches!(
            Schedule::parse("0 3 * *", None),
            Err(ScheduleError::Expr(_))
        ));
    }
}
