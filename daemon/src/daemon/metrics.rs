//! `GET /metrics`: the daemon's own numbers in the Prometheus text format
//! (prometheus-client). Counters and histograms are fed when a run ends, from its
//! recorded steps; gauges are read at scrape time. What an alert is written on
//! (the last success and last status of each pipeline) is also read from the
//! store at start, so that "no success for 26 h" survives a restart. The
//! `process_*` family is the process collector's ([`process`]).

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::{RunStatus, StepStatus};

mod process;

type Labels = Vec<(String, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// The statuses of `millrace_pipeline_last_run_status`: how a run can end (an
/// interrupted run is resumed, so it has not ended).
const FINISHED: [RunStatus; 3] = [
    RunStatus::Succeeded,
    RunStatus::Failed,
    RunStatus::Cancelled,
];

pub struct Metrics {
    registry: Mutex<Registry>,
    /// Unprefixed: the `process_*` names every Prometheus client exports.
    process: Registry,
    runs_started: Family<Labels, Counter>,
    runs_finished: Family<Labels, Counter>,
    step_seconds: HistogramFamily,
    reuse: Family<Labels, Counter>,
    items: Family<Labels, Counter>,
    trigger_latency: Histogram,
    queue_depth: Gauge,
    running_runs: Gauge,
    running_steps: Gauge,
    precompiled: Family<Labels, Gauge>,
    given_up: Gauge,
    last_success: Family<Labels, Gauge<f64, AtomicU64>>,
    last_status: Family<Labels, Gauge>,
    step_failures: Family<Labels, Counter>,
}

fn step_histogram() -> Histogram {
    // 10 ms … ~2.8 h
    Histogram::new(exponential_buckets(0.01, 2.0, 21))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Mutex::new(Registry::with_prefix("millrace")),
            runs_started: Family::default(),
            runs_finished: Family::default(),
            step_seconds: Family::new_with_constructor(step_histogram),
            reuse: Family::default(),
            items: Family::default(),
            trigger_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            queue_depth: Gauge::default(),
            running_runs: Gauge::default(),
            running_steps: Gauge::default(),
            precompiled: Family::default(),
            given_up: Gauge::default(),
            last_success: Family::default(),
            last_status: Family::default(),
            step_failures: Family::default(),
            process: Registry::default(),
        };
        m.process
            .register_collector(Box::new(process::ProcessCollector));
        {
            let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
            r.register(
                "runs_started",
                "Runs started, by pipeline",
                m.runs_started.clone(),
            );
            r.register(
                "runs_finished",
                "Runs finished, by pipeline and status",
                m.runs_finished.clone(),
            );
            r.register(
                "step_duration_seconds",
                "Wall time of executed steps, by runtime",
                m.step_seconds.clone(),
            );
            r.register(
                "reuse",
                "Step cache decisions: hit (reused) or miss (executed)",
                m.reuse.clone(),
            );
            r.register(
                "foreach_items",
                "Items of foreach steps, by pipeline, step and result (executed, reused, failed)",
                m.items.clone(),
            );
            r.register(
                "trigger_to_first_step_seconds",
                "From a run's creation (its trigger) to its first step's start",
                m.trigger_latency.clone(),
            );
            r.register("queue_depth", "Runs queued", m.queue_depth.clone());
            r.register("running_runs", "Runs running", m.running_runs.clone());
            r.register(
                "running_steps",
                "Steps holding a step slot",
                m.running_steps.clone(),
            );
            r.register(
                "precompiled_modules",
                "Compiled wasm: loaded from the cache (hit) or compiled (miss), since start",
                m.precompiled.clone(),
            );
            r.register(
                "runs_given_up_after_crashes",
                "Failed runs the daemon stopped resuming because the process stopped while running them 3 times (from the store)",
                m.given_up.clone(),
            );
            r.register(
                "pipeline_last_success_timestamp_seconds",
                "When the newest succeeded run of each pipeline finished (Unix time; from the store at start)",
                m.last_success.clone(),
            );
            r.register(
                "pipeline_last_run_status",
                "1 for the status of each pipeline's newest finished run, 0 for the other statuses (from the store at start)",
                m.last_status.clone(),
            );
            r.register(
                "step_failures",
                "Steps that failed, by pipeline and step, counted when their run ends",
                m.step_failures.clone(),
            );
            let build_info: Family<Labels, Gauge> = Family::default();
            build_info
                .get_or_create(&vec![
                    ("version".into(), env!("CARGO_PKG_VERSION").into()),
                    ("wasmtime".into(), crate::cli::WASMTIME_VERSION.into()),
                    (
                        "python_runtime".into(),
                        crate::executor::python::RUNTIME_NAME.into(),
                    ),
                ])
                .set(1);
            r.register(
                "build_info",
                "1, labelled with the versions `millrace --version` prints",
                build_info,
            );
        }
        m
    }

    /// How a pipeline's run ended, at `finished_at` (ms): the state set of its last
    /// status, and its last success if it succeeded. An older run that ends later
    /// (a resumed one) does not move the last success back.
    fn set_last_outcome(&self, pipeline: &str, status: RunStatus, finished_at: Option<i64>) {
        if !FINISHED.contains(&status) {
            return;
        }
        for s in FINISHED {
            self.last_status
                .get_or_create(&vec![
                    ("pipeline".into(), pipeline.into()),
                    ("status".into(), s.to_string()),
                ])
                .set(i64::from(s == status));
        }
        if let (RunStatus::Succeeded, Some(ms)) = (status, finished_at) {
            let g = self
                .last_success
                .get_or_create(&vec![("pipeline".into(), pipeline.into())]);
            let secs = ms as f64 / 1000.0;
            if secs > g.get() {
                g.set(secs);
            }
        }
    }

    /// At start: each loaded pipeline's last status and last success, from the
    /// store (a pipeline with no finished run gets no series).
    pub fn restore<'a>(
        &self,
        db: &crate::store::db::Batch<'_>,
        pipelines: impl IntoIterator<Item = &'a str>,
    ) -> crate::store::db::Result<()> {
        for p in pipelines {
            let (last, success) = db.last_outcomes(p)?;
            if let Some(ms) = success {
                self.set_last_outcome(p, RunStatus::Succeeded, Some(ms));
            }
            if let Some(status) = last {
                self.set_last_outcome(p, status, None);
            }
        }
        Ok(())
    }

    pub fn run_started(&self, pipeline: &str) {
        self.runs_started
            .get_or_create(&vec![("pipeline".into(), pipeline.into())])
            .inc();
    }

    /// A run ended: its status, and per step what was recorded.
    pub fn run_finished(
        &self,
        run: &crate::store::db::RunRow,
        steps: &[crate::store::db::StepRow],
    ) {
        self.runs_finished
            .get_or_create(&vec![
                ("pipeline".into(), run.pipeline.clone()),
                ("status".into(), run.status.to_string()),
            ])
            .inc();
        self.set_last_outcome(&run.pipeline, run.status, run.finished_at);
        for s in steps {
            if s.status == StepStatus::Failed {
                self.step_failures
                    .get_or_create(&vec![
                        ("pipeline".into(), run.pipeline.clone()),
                        ("step".into(), s.name.clone()),
                    ])
                    .inc();
            }
            match s.status {
                StepStatus::Reused => {
                    self.reuse
                        .get_or_create(&vec![("result".into(), "hit".into())])
                        .inc();
                }
                StepStatus::Succeeded | StepStatus::Failed => {
                    self.reuse
                        .get_or_create(&vec![("result".into(), "miss".into())])
                        .inc();
                    if let (Some(a), Some(b)) = (s.started_at, s.finished_at) {
                        self.step_seconds
                            .get_or_create(&vec![("runtime".into(), s.runtime.clone())])
                            .observe((b - a).max(0) as f64 / 1000.0);
                    }
                }
                _ => {}
            }
        }
        if let Some(first) = steps.iter().filter_map(|s| s.started_at).min() {
            self.trigger_latency
                .observe((first - run.created_at).max(0) as f64 / 1000.0);
        }
    }

    /// A run's foreach steps ended: their items counted by how each ended. The
    /// labels are the step, not the item: an inbox of a million files must not
    /// make a million series.
    pub fn items_finished(
        &self,
        pipeline: &str,
        steps: &[(String, Vec<crate::store::db::ItemRow>)],
    ) {
        for (step, rows) in steps {
            for r in rows {
                let result = match r.status {
                    StepStatus::Succeeded => "executed",
                    StepStatus::Reused => "reused",
                    StepStatus::Failed => "failed",
                    _ => continue,
                };
                self.items
                    .get_or_create(&vec![
                        ("pipeline".into(), pipeline.into()),
                        ("step".into(), step.clone()),
                        ("result".into(), result.into()),
                    ])
                    .inc();
            }
        }
    }

    /// The text exposition, with the gauges read now.
    pub fn render(
        &self,
        queued: usize,
        running_runs: usize,
        running_steps: usize,
        precompiled: (u64, u64),
        given_up: u64,
    ) -> String {
        self.given_up
            .set(i64::try_from(given_up).unwrap_or(i64::MAX));
        self.queue_depth.set(queued as i64);
        self.running_runs.set(running_runs as i64);
        self.running_steps.set(running_steps as i64);
        self.precompiled
            .get_or_create(&vec![("result".into(), "hit".into())])
            .set(precompiled.0 as i64);
        self.precompiled
            .get_or_create(&vec![("result".into(), "miss".into())])
            .set(precompiled.1 as i64);
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let _ = encode_registry(&mut out, &r);
        let _ = encode_registry(&mut out, &self.process);
        let _ = encode_eof(&mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition: a
/// counter family's `HELP`/`TYPE` lines name it with its `_total` suffix, and there
/// is no `# EOF`. What `promtool check metrics` and older scrapers expect.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_given_up_are_a_gauge() {
        let m = super::Metrics::new();
        let text = super::to_prometheus_text(&m.render(0, 0, 0, (0, 0), 2));
        assert!(
            text.contains("# TYPE millrace_runs_given_up_after_crashes gauge\nmillrace_runs_given_up_after_crashes 2\n"),
            "{text}"
        );
    }

    #[test]
    fn foreach_items_are_counted_by_step_and_result() {
        use crate::model::StepStatus;
        let m = super::Metrics::new();
        let row = |item: &str, status| crate::store::db::ItemRow {
            item: item.into(),
            status,
            cache_key: String::new(),
            reused_from: None,
            attempts: 1,
            error: None,
            started_at: None,
            finished_at: None,
        };
        let rows = vec![
            row("a", StepStatus::Succeeded),
            row("b", StepStatus::Reused),
            row("c", StepStatus::Reused),
            row("d", StepStatus::Failed),
        ];
        m.items_finished("p", &[("score".into(), rows)]);
        let text = super::to_prometheus_text(&m.render(0, 0, 0, (0, 0), 0));
        for (result, n) in [("executed", 1), ("reused", 2), ("failed", 1)] {
            let line = format!(
                "millrace_foreach_items_total{{pipeline=\"p\",step=\"score\",result=\"{result}\"}} {n}\n"
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
    }

    #[test]
    fn the_last_status_is_a_state_set_and_the_last_success_only_moves_forward() {
        use crate::model::RunStatus;
        let m = super::Metrics::new();
        m.set_last_outcome("p", RunStatus::Succeeded, Some(2_000_500));
        m.set_last_outcome("p", RunStatus::Failed, Some(3_000_000));
        // A resumed older run that succeeds now: its status counts, its time
        // (before the last success) does not.
        m.set_last_outcome("p", RunStatus::Succeeded, Some(1_000_000));
        m.set_last_outcome("p", RunStatus::Interrupted, Some(4_000_000));
        let text = super::to_prometheus_text(&m.render(0, 0, 0, (0, 0), 0));
        for want in [
            "millrace_pipeline_last_success_timestamp_seconds{pipeline=\"p\"} 2000.5\n",
            "millrace_pipeline_last_run_status{pipeline=\"p\",status=\"succeeded\"} 1\n",
            "millrace_pipeline_last_run_status{pipeline=\"p\",status=\"failed\"} 0\n",
            "millrace_pipeline_last_run_status{pipeline=\"p\",status=\"cancelled\"} 0\n",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
        assert!(!text.contains("status=\"interrupted\""), "{text}");
    }

    #[test]
    fn counters_get_their_total_names_in_the_classic_format() {
        let om = "# HELP x_runs Runs.\n# TYPE x_runs counter\nx_runs_total 1\n# HELP x_q Q.\n# TYPE x_q gauge\nx_q 0\n# EOF\n";
        assert_eq!(
            super::to_prometheus_text(om),
            "# HELP x_runs_total Runs.\n# TYPE x_runs_total counter\nx_runs_total 1\n# HELP x_q Q.\n# TYPE x_q gauge\nx_q 0\n"
        );
    }
}
