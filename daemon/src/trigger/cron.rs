//! Cron schedules: croner for the calendar maths, chrono-tz for IANA zones.
//!
//! Firings follow the trigger's zone and its DST rules. A pattern with fixed hours
//! (`30 2 * * *`, `0,30 2 * * *`) is walked on the local wall clock: a wall time that
//! does not exist (spring forward) fires once, at the first instant after the gap; one
//! that happens twice (fall back) fires once, at its first occurrence. A pattern whose
//! hour field is `*` is an interval: it fires at every real instant it matches, so
//! `*/30 * * * *` keeps its rhythm through both transitions.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Timelike, Utc};
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
    /// The hour field is `*`: fire at every real instant that matches.
    interval: bool,
}

/// The firings a cron trigger did not run on time: what `catchup = "latest"` and
/// `"coalesce"` report (`missed_count`, `missed_from`, `missed_to`), computed in
/// one place so the two policies agree on the same gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missed {
    pub count: usize,
    /// The oldest missed firing.
    pub from: Option<DateTime<Tz>>,
    /// The newest missed firing.
    pub to: Option<DateTime<Tz>>,
}

/// Of the `count` firings due since a trigger's cursor (`due`: the latest of
/// them, oldest first; `first`: the oldest of all), the missed ones: all of them,
/// but the latest when it is on time, since that one runs as scheduled.
pub fn missed(
    due: &[DateTime<Tz>],
    count: usize,
    first: Option<DateTime<Tz>>,
    latest_on_time: bool,
) -> Missed {
    let n = count.saturating_sub(usize::from(latest_on_time));
    if n == 0 {
        return Missed {
            count: 0,
            from: None,
            to: None,
        };
    }
    let to = if latest_on_time {
        due.len().checked_sub(2).map(|i| due[i])
    } else {
        due.last().copied()
    };
    Missed {
        count: n,
        from: first.or_else(|| due.first().copied()),
        to,
    }
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
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let hour = if fields.len() == 6 {
            fields[2]
        } else {
            fields[1]
        };
        let s = Schedule {
            cron,
            tz,
            expr: expr.to_string(),
            interval: hour == "*",
        };
        // `0 0 31 2 *` parses but never fires: say so now, not never.
        if s.next_after(Utc::now()).is_none() {
            return Err(ScheduleError::Expr(format!(
                "cron expression `{expr}` never fires (no date matches it)"
            )));
        }
        Ok(s)
    }

    /// The first firing strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.interval {
            return self
                .cron
                .find_next_occurrence(&t.with_timezone(&self.tz), false)
                .ok()
                .map(|d| d.with_timezone(&Utc));
        }
        // Walk matching wall-clock times, from a little before `t`'s own wall time
        // (a DST shift can map an earlier wall time to a later instant), and keep
        // the earliest instant after `t`.
        let margin = chrono::TimeDelta::hours(3);
        let start = t.with_timezone(&self.tz).naive_local() - margin;
        let mut cursor = start.and_utc();
        let mut best: Option<DateTime<Utc>> = None;
        for _ in 0..200_000 {
            let next = self.cron.find_next_occurrence(&cursor, false).ok()?;
            let wall = next.naive_utc();
            if let Some(b) = best
                && wall > b.with_timezone(&self.tz).naive_local() + margin
            {
                break;
            }
            if let Some(at) = self.instant(wall)
                && at > t
                && best.is_none_or(|b| at < b)
            {
                best = Some(at);
            }
            cursor = next;
        }
        best
    }

    /// The instant a wall-clock time fires at: the first of two, or the first
    /// instant after a gap.
    fn instant(&self, wall: chrono::NaiveDateTime) -> Option<DateTime<Utc>> {
        use chrono::offset::LocalResult;
        match self.tz.from_local_datetime(&wall) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(a, _) => Some(a.with_timezone(&Utc)),
            LocalResult::None => {
                let mut w = wall;
                for _ in 0..(24 * 60) {
                    w += chrono::TimeDelta::minutes(1);
                    let w0 = w.with_second(0).unwrap_or(w);
                    if let Some(t) = self.tz.from_local_datetime(&w0).earliest() {
                        return Some(t.with_timezone(&Utc));
                    }
                }
                None
            }
        }
    }

    /// Firings in `(from, to]`: the first, the last `limit` of them, and how many
    /// there are (counting stops at [`MAX_FIRINGS`] × 100).
    pub fn between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: usize,
    ) -> (Vec<DateTime<Tz>>, usize) {
        let mut out = std::collections::VecDeque::new();
        let mut count = 0;
        let mut t = from;
        while let Some(next) = self.next_after(t) {
            if next > to || count >= MAX_FIRINGS * 100 {
                break;
            }
            if out.len() == limit {
                out.pop_front();
            }
            if limit > 0 {
                out.push_back(next.with_timezone(&self.tz));
            }
            count += 1;
            t = next;
        }
        (out.into(), count)
    }

    /// What `millrace schedule` lists: the earliest `limit` firings after `from`
    /// (up to `to` when given) and how many fall in `(from, to]` in all (counting
    /// stops at [`MAX_FIRINGS`] × 100). Without `to` the total is what is listed.
    pub fn earliest(
        &self,
        from: DateTime<Utc>,
        to: Option<DateTime<Utc>>,
        limit: usize,
    ) -> (Vec<DateTime<Tz>>, usize) {
        let mut out = Vec::new();
        let mut count = 0;
        let mut t = from;
        while let Some(next) = self.next_after(t) {
            let past_end = to.is_some_and(|to| next > to);
            if past_end || count >= MAX_FIRINGS * 100 || (to.is_none() && count == limit) {
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

    /// The first firing in `(from, to]`.
    pub fn first_between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Option<DateTime<Tz>> {
        self.next_after(from)
            .filter(|t| *t <= to)
            .map(|t| t.with_timezone(&self.tz))
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
    fn lists_and_steps_in_fixed_hours_fire_once_through_both_transitions() {
        let spring = ("2026-03-28T22:00:00Z", "2026-03-29T03:00:00Z");
        let autumn = ("2026-10-24T22:00:00Z", "2026-10-25T03:00:00Z");
        let f = |e: &str, (a, b): (&str, &str)| firings(e, "Europe/Stockholm", a, b);
        // 02:15 and 02:45 do not exist: one firing at 03:00.
        assert_eq!(f("15,45 2 * * *", spring), ["2026-03-29T03:00:00+02:00"]);
        assert_eq!(f("*/20 2 * * *", spring), ["2026-03-29T03:00:00+02:00"]);
        assert_eq!(f("0 2,3 * * *", spring), ["2026-03-29T03:00:00+02:00"]);
        // 02:xx happens twice: each fires once, at its first occurrence.
        assert_eq!(
            f("15,45 2 * * *", autumn),
            ["2026-10-25T02:15:00+02:00", "2026-10-25T02:45:00+02:00"]
        );
        assert_eq!(
            f("0 2,3 * * *", autumn),
            ["2026-10-25T02:00:00+02:00", "2026-10-25T03:00:00+01:00"]
        );
        // An interval keeps firing on every real instant.
        assert_eq!(f("0 * * * *", autumn).len(), 5, "one per real hour");
    }

    /// Eleven firings since the cursor, the latest of them just now: ten were
    /// missed, from the first to the one before the latest. Down past the latest
    /// too, all eleven were.
    #[test]
    fn missed_firings_leave_out_an_on_time_latest() {
        let s = Schedule::parse("*/1 * * * * *", None).expect("valid");
        let (from, to) = (at("2026-01-01T00:00:00Z"), at("2026-01-01T00:00:11Z"));
        let (due, count) = s.between(from, to, 1000);
        let first = s.first_between(from, to);
        assert_eq!((due.len(), count), (11, 11));
        let m = missed(&due, count, first, true);
        assert_eq!(m.count, 10);
        let shown = |t: Option<DateTime<Tz>>| t.map(|t| t.to_rfc3339());
        assert_eq!(shown(m.from).as_deref(), Some("2026-01-01T00:00:01+00:00"));
        assert_eq!(shown(m.to).as_deref(), Some("2026-01-01T00:00:10+00:00"));
        let m = missed(&due, count, first, false);
        assert_eq!(m.count, 11);
        assert_eq!(shown(m.to).as_deref(), Some("2026-01-01T00:00:11+00:00"));
        // Only the latest is due, on time: nothing was missed.
        assert_eq!(missed(&due[10..], 1, due.last().copied(), true).count, 0);
        // A tail shorter than the gap still names its oldest firing.
        let (tail, count) = s.between(from, to, 3);
        assert_eq!(missed(&tail, count, first, true).count, 10);
        assert_eq!(shown(missed(&tail, count, first, true).from), shown(first));
    }

    #[test]
    fn between_keeps_the_latest_firings_and_counts_them_all() {
        let s = Schedule::parse("*/1 * * * * *", None).expect("valid");
        let (tail, n) = s.between(at("2026-01-01T00:00:00Z"), at("2026-01-01T01:00:00Z"), 3);
        assert_eq!(n, 3600);
        assert_eq!(
            tail.last().map(|t| t.to_rfc3339()).as_deref(),
            Some("2026-01-01T01:00:00+00:00")
        );
        assert_eq!(tail.len(), 3);
        assert!(matches!(
            Schedule::parse("0 0 31 2 *", None),
            Err(ScheduleError::Expr(m)) if m.contains("never fires")
        ));
    }

    #[test]
    fn earliest_lists_from_the_start_of_the_window_and_counts_the_rest() {
        let s = Schedule::parse("0 3 * * *", None).expect("valid");
        let from = at("2026-12-01T10:00:00Z");
        let (next, n) = s.earliest(from, None, 3);
        let next: Vec<String> = next.iter().map(|t| t.to_rfc3339()).collect();
        assert_eq!(
            next,
            [
                "2026-12-02T03:00:00+00:00",
                "2026-12-03T03:00:00+00:00",
                "2026-12-04T03:00:00+00:00"
            ]
        );
        assert_eq!(n, 3, "without an end only what is listed is counted");
        let (first, n) = s.earliest(from, Some(at("2026-12-31T23:00:00Z")), 2);
        assert_eq!(first[0].to_rfc3339(), "2026-12-02T03:00:00+00:00");
        assert_eq!((first.len(), n), (2, 30));
        let (none, n) = s.earliest(from, Some(at("2026-12-02T02:00:00Z")), 5);
        assert!(none.is_empty() && n == 0);
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
