//! `run` and `resume` as a person sees them: progress lines (or a bar on a
//! terminal), Ctrl-C, the summary and the exit code.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use super::Error;
use super::validate::summary_line;
use crate::engine::{Event, RunError, RunSummary};
use crate::model::StepStatus;
use crate::store::Store;
use crate::store::artifacts::escape_controls;
use crate::view::RunView;

pub(super) fn run_error(e: RunError) -> anyhow::Error {
    match e {
        RunError::Params(m) => Error::usage(m).into(),
        RunError::Definition(r) => Error::Report(format!("{r}{}", summary_line(&r))).into(),
        RunError::Input { .. } => Error::config(e.to_string()).into(),
        RunError::NoSuchRun(_) | RunError::AlreadySucceeded(_) | RunError::Busy(_) => {
            Error::usage(e.to_string()).into()
        }
        other => anyhow::Error::new(other),
    }
}

/// The summary of a run driven by this process, with each failed step's error
/// and the end of its log, and the exit code.
pub(super) fn finish_run(
    summary: Result<RunSummary, RunError>,
    store: &Store,
    json: bool,
) -> anyhow::Result<i32> {
    let s = summary.map_err(run_error)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        eprintln!(
            "run {} {}: {} executed, {} reused, {} failed, {} skipped in {:.2}s",
            s.run_id, s.status, s.executed, s.reused, s.failed, s.skipped, s.seconds
        );
        if s.failed > 0
            && let Some(view) = RunView::load(store, s.run_id)?
        {
            let log_of = |step: &str| {
                let attempts = store.db().read().attempts(s.run_id, step).ok()?;
                log_tail(std::path::Path::new(attempts.last()?.log_path.as_ref()?))
            };
            eprint!("{}", failed_steps(&serde_json::to_value(&view)?, log_of));
        }
    }
    Ok(super::error::run_exit_code(s.status))
}

/// Ctrl-C / SIGTERM cancel the run; the steps are stopped and the run recorded
/// as cancelled (resumable).
pub(super) fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("millrace: stopping the run (it can be finished later with `millrace resume`)");
        t.cancel();
    });
    token
}

/// Progress for `run`: a bar on a terminal, plain lines otherwise.
pub(super) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    json: bool,
}

pub(super) fn progress(json: bool, steps: usize) -> Arc<Progress> {
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(steps as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    Arc::new(Progress { bar, json })
}

impl Progress {
    pub(super) fn sink(self: &Arc<Self>) -> crate::engine::EventSink {
        let me = self.clone();
        Arc::new(move |e: &Event| me.event(e))
    }

    fn line(&self, s: String) {
        match &self.bar {
            Some(b) => b.println(s),
            None if !self.json => eprintln!("{s}"),
            None => {}
        }
    }

    fn event(&self, e: &Event) {
        match e {
            Event::RunStarted {
                run,
                pipeline,
                steps,
            } => self.line(format!("run {run} of {pipeline}: {steps} steps")),
            Event::StepStarted { step, attempt } => {
                if let Some(b) = &self.bar {
                    b.set_message(step.clone());
                } else if *attempt > 1 {
                    self.line(format!("  {step}: attempt {attempt}"));
                }
            }
            Event::StepFinished {
                step,
                status,
                detail,
                elapsed,
            } => {
                let retrying = *status == StepStatus::Failed && detail.ends_with("retrying");
                if let Some(b) = &self.bar
                    && !retrying
                {
                    b.inc(1);
                }
                let time = if elapsed.is_zero() {
                    String::new()
                } else {
                    format!(" ({:.2}s)", elapsed.as_secs_f64())
                };
                let detail = if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                };
                self.line(format!("  {step} {status}{time}{detail}"));
            }
        }
    }

    pub(super) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The log lines a failed step's summary quotes.
const TAIL_LINES: usize = 20;

/// For each failed step of a finished run (its [`crate::view::RunView`] as JSON,
/// from the store or the API): its error, the last [`TAIL_LINES`] lines of its
/// log and the command that shows the rest. `log_of(step)` gives the step's
/// latest log. Empty when no step failed.
pub(super) fn failed_steps(
    run: &serde_json::Value,
    log_of: impl Fn(&str) -> Option<String>,
) -> String {
    let id = run["id"].as_i64().unwrap_or(0);
    let mut out = String::new();
    let failed = run["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["status"].as_str() == Some(StepStatus::Failed.as_str()));
    for step in failed {
        let name = step["name"].as_str().unwrap_or("?");
        let error = step["error"].as_str().unwrap_or("failed");
        out.push_str(&format!("  step `{name}` failed: {error}\n"));
        let log = log_of(name).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        if !lines.is_empty() {
            let from = lines.len().saturating_sub(TAIL_LINES);
            let shown = if from > 0 {
                format!("last {} of {} log lines", lines.len() - from, lines.len())
            } else {
                "its log".to_string()
            };
            out.push_str(&format!("  {shown}:\n"));
            for l in &lines[from..] {
                // A guest wrote these lines: escape sequences and bidi overrides
                // must not rewrite the operator's terminal.
                out.push_str(&format!("    | {}\n", escape_controls(l)));
            }
        }
        out.push_str(&format!("  (the whole log: millrace logs {id} {name})\n"));
    }
    out
}

/// The end of a log file: its last 64 KiB, enough for [`TAIL_LINES`] lines.
pub(super) fn log_tail(path: &std::path::Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(64 * 1024);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    // A partial first line (cut by the window) is dropped.
    Some(match (start > 0, text.find('\n')) {
        (true, Some(i)) => text[i + 1..].to_string(),
        _ => text,
    })
}
