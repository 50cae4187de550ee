//! The scheduler against a fake executor: a real store, planner, sandbox
//! directories and records, but each attempt is a closure that writes its
//! outputs (or fails) as the test says, so ordering, slots, failures, cancel
//! and retries are observed without running a guest.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::executor::{AttemptSpec, Outcome};

/// What the fake saw, in order: `start <step> <attempt>` and `end <step> <attempt>`.
type Log = Arc<Mutex<Vec<String>>>;

/// How the fake ends an attempt of a step.
type Behaviour = Arc<dyn Fn(&str, u32) -> Outcome + Send + Sync>;

struct Fixture {
    dir: tempfile::TempDir,
    pipeline: Pipeline,
    text: String,
}

impl Fixture {
    /// A pipeline of `steps` (wasm steps may name `step.wasm`, which is never
    /// run) with an input `a` at `data/a.txt`.
    fn new(steps: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/a.txt"), "v1\n").unwrap();
        std::fs::write(dir.path().join("step.wasm"), b"\0asm never run").unwrap();
        let text = format!("name = \"p\"\n[inputs.a]\npath = \"data/a.txt\"\n{steps}");
        let (p, report) = crate::graph::parse(
            &dir.path().join("p.toml"),
            text.clone(),
            &Environment::default(),
        );
        let pipeline = p.unwrap_or_else(|| panic!("{report}"));
        Fixture {
            dir,
            pipeline,
            text,
        }
    }

    /// An engine of `slots` step slots whose attempts the fake runs: it logs the
    /// start, awaits `hold(step)`, writes a file into each output directory and
    /// ends as `behaviour` says.
    fn engine(
        &self,
        slots: usize,
        log: &Log,
        behaviour: Behaviour,
        hold: Arc<dyn Fn(&str) -> HoldFuture + Send + Sync>,
    ) -> Arc<Engine> {
        let store = Arc::new(Store::open(&self.dir.path().join(".state")).unwrap());
        let log = log.clone();
        let fake: FakeExecutor = Arc::new(move |spec: AttemptSpec| {
            let log = log.clone();
            let behaviour = behaviour.clone();
            let step = env_of(&spec, "MILLRACE_STEP");
            let attempt: u32 = env_of(&spec, "MILLRACE_ATTEMPT").parse().unwrap();
            let held = hold(&step);
            Box::pin(async move {
                log.lock().unwrap().push(format!("start {step} {attempt}"));
                held.await;
                let outcome = behaviour(&step, attempt);
                if outcome == Outcome::Exited(0) {
                    write_outputs(&spec, &step);
                }
                log.lock().unwrap().push(format!("end {step} {attempt}"));
                outcome
            })
        });
        Arc::new(Engine::new(store, EngineConfig::new(slots)).with_fake_executor(fake))
    }

    async fn run(&self, engine: &Arc<Engine>, cancel: CancellationToken) -> RunSummary {
        let events: EventSink = Arc::new(|_: &Event| {});
        let path = self.dir.path().join("p.toml");
        let run = engine.run(
            &self.pipeline,
            &self.text,
            &path,
            RunRequest::default(),
            events,
            cancel,
        );
        // A guard against a scheduler that never ends, not a timing assertion.
        tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("the run did not end")
            .unwrap()
    }
}

type HoldFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

fn no_hold() -> Arc<dyn Fn(&str) -> HoldFuture + Send + Sync> {
    Arc::new(|_: &str| Box::pin(async {}) as HoldFuture)
}

fn succeed() -> Behaviour {
    Arc::new(|_: &str, _: u32| Outcome::Exited(0))
}

fn env_of(spec: &AttemptSpec, name: &str) -> String {
    spec.env
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("{name} is not in the attempt's environment"))
}

/// A file named after the step in every output directory under `/out`.
fn write_outputs(spec: &AttemptSpec, step: &str) {
    let out = spec.mounts.iter().find(|m| m.guest == "/out").unwrap();
    for entry in std::fs::read_dir(&out.host).unwrap() {
        let dir = entry.unwrap().path();
        std::fs::write(dir.join("made-by"), step).unwrap();
    }
}

fn position(log: &[String], line: &str) -> usize {
    log.iter()
        .position(|l| l == line)
        .unwrap_or_else(|| panic!("`{line}` is not in {log:?}"))
}

fn step_statuses(engine: &Engine, run: i64) -> HashMap<String, StepStatus> {
    engine
        .store
        .db()
        .read()
        .steps(run)
        .unwrap()
        .into_iter()
        .map(|s| (s.name, s.status))
        .collect()
}

/// A step whose key is its own (its name is an argument): two steps reading
/// the same input would otherwise share a key, and one could reuse the other.
fn wasm_step(name: &str, inputs: &str) -> String {
    format!(
        "[[step]]\nname = \"{name}\"\nwasm = \"step.wasm\"\nargs = [\"{name}\"]\ninputs = {{ {inputs} }}\noutputs = [\"out\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_starts_only_after_every_step_it_reads_from_ended() {
    // a -> b -> d, a -> c -> d
    let f = Fixture::new(
        &[
            wasm_step("a", "x = \"inputs.a\""),
            wasm_step("b", "x = \"a.out\""),
            wasm_step("c", "x = \"a.out\""),
            wasm_step("d", "x = \"b.out\", y = \"c.out\""),
        ]
        .concat(),
    );
    let log = Log::default();
    let engine = f.engine(4, &log, succeed(), no_hold());
    let summary = f.run(&engine, CancellationToken::new()).await;
    assert_eq!(summary.status, RunStatus::Succeeded);
    assert_eq!(summary.executed, 4);
    let log = log.lock().unwrap().clone();
    for (before, after) in [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")] {
        assert!(
            position(&log, &format!("end {before} 1"))
                < position(&log, &format!("start {after} 1")),
            "{after} started before {before} ended: {log:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_steps_run_in_parallel_up_to_the_slots_and_no_further() {
    let steps: String = (1..=6)
        .map(|n| wasm_step(&format!("s{n}"), "x = \"inputs.a\""))
        .collect();
    let f = Fixture::new(&steps);
    let log = Log::default();
    // Each attempt waits at a barrier of two: the run ends only if two attempts
    // run at once (with one slot it would hang until the guard fails it).
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hold = {
        let (barrier, running, most) = (barrier.clone(), running.clone(), most.clone());
        Arc::new(move |_: &str| {
            let (barrier, running, most) = (barrier.clone(), running.clone(), most.clone());
            Box::pin(async move {
                use std::sync::atomic::Ordering::SeqCst;
                let now = running.fetch_add(1, SeqCst) + 1;
                most.fetch_max(now, SeqCst);
                barrier.wait().await;
                running.fetch_sub(1, SeqCst);
            }) as HoldFuture
        })
    };
    let engine = f.engine(2, &log, succeed(), hold);
    let summary = f.run(&engine, CancellationToken::new()).await;
    assert_eq!(summary.status, RunStatus::Succeeded);
    assert_eq!(summary.executed, 6);
    assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_skips_its_dependants_and_independent_branches_finish() {
    let f = Fixture::new(
        &[
            wasm_step("bad", "x = \"inputs.a\""),
            wasm_step("after_bad", "x = \"bad.out\""),
            wasm_step("last", "x = \"after_bad.out\""),
            wasm_step("good", "x = \"inputs.a\""),
            wasm_step("after_good", "x = \"good.out\""),
        ]
        .concat(),
    );
    let log = Log::default();
    let behaviour: Behaviour = Arc::new(|step: &str, _: u32| {
        if step == "bad" {
            Outcome::Exited(3)
        } else {
            Outcome::Exited(0)
        }
    });
    let engine = f.engine(2, &log, behaviour, no_hold());
    let summary = f.run(&engine, CancellationToken::new()).await;
    assert_eq!(summary.status, RunStatus::Failed);
    // Executed counts the steps that ran, failed or not.
    assert_eq!(
        (summary.executed, summary.failed, summary.skipped),
        (3, 1, 2)
    );
    let statuses = step_statuses(&engine, summary.run_id);
    assert_eq!(statuses["bad"], StepStatus::Failed);
    assert_eq!(statuses["after_bad"], StepStatus::Skipped);
    assert_eq!(statuses["last"], StepStatus::Skipped);
    assert_eq!(statuses["good"], StepStatus::Succeeded);
    assert_eq!(statuses["after_good"], StepStatus::Succeeded);
    let started: HashSet<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| l.strip_prefix("start ").map(str::to_string))
        .collect();
    assert!(!started.contains("after_bad 1") && !started.contains("last 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_the_running_step_and_nothing_else_starts() {
    let f = Fixture::new(
        &[
            wasm_step("slow", "x = \"inputs.a\""),
            wasm_step("next", "x = \"slow.out\""),
        ]
        .concat(),
    );
    let log = Log::default();
    let cancel = CancellationToken::new();
    // `slow` cancels the run once it runs, then never ends by itself.
    let hold = {
        let cancel = cancel.clone();
        Arc::new(move |_: &str| {
            let cancel = cancel.clone();
            Box::pin(async move {
                cancel.cancel();
                std::future::pending::<()>().await;
            }) as HoldFuture
        })
    };
    let engine = f.engine(2, &log, succeed(), hold);
    let summary = f.run(&engine, cancel).await;
    assert_eq!(summary.status, RunStatus::Cancelled);
    assert_eq!(summary.executed, 0);
    let statuses = step_statuses(&engine, summary.run_id);
    assert_eq!(statuses["slow"], StepStatus::Cancelled);
    assert_eq!(statuses["next"], StepStatus::Cancelled);
    assert_eq!(*log.lock().unwrap(), vec!["start slow 1".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_is_retried_until_one_succeeds() {
    let f = Fixture::new(&format!(
        "{}retries = {{ attempts = 3, backoff = \"1ms\" }}\n{}",
        wasm_step("flaky", "x = \"inputs.a\""),
        wasm_step("after", "x = \"flaky.out\""),
    ));
    let log = Log::default();
    let behaviour: Behaviour = Arc::new(|step: &str, attempt: u32| {
        if step == "flaky" && attempt < 3 {
            Outcome::Exited(1)
        } else {
            Outcome::Exited(0)
        }
    });
    let engine = f.engine(2, &log, behaviour, no_hold());
    let summary = f.run(&engine, CancellationToken::new()).await;
    assert_eq!(summary.status, RunStatus::Succeeded);
    assert_eq!(summary.executed, 2);
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        [
            "start flaky 1",
            "end flaky 1",
            "start flaky 2",
            "end flaky 2",
            "start flaky 3",
            "end flaky 3",
            "start after 1",
            "end after 1",
        ]
    );
    let attempts = engine
        .store
        .db()
        .read()
        .attempts(summary.run_id, "flaky")
        .unwrap();
    assert_eq!(attempts.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_used_up_fail_the_step_with_the_count() {
    let f = Fixture::new(&format!(
        "{}retries = {{ attempts = 2, backoff = \"1ms\" }}\n",
        wasm_step("never", "x = \"inputs.a\""),
    ));
    let log = Log::default();
    let engine = f.engine(
        1,
        &log,
        Arc::new(|_: &str, _: u32| Outcome::Exited(1)),
        no_hold(),
    );
    let summary = f.run(&engine, CancellationToken::new()).await;
    assert_eq!(summary.status, RunStatus::Failed);
    assert_eq!(log.lock().unwrap().len(), 4);
    let step = engine
        .store
        .db()
        .read()
        .steps(summary.run_id)
        .unwrap()
        .into_iter()
        .find(|s| s.name == "never")
        .unwrap();
    assert_eq!(step.status, StepStatus::Failed);
    let error = step.error.unwrap_or_default();
    assert!(error.ends_with("(after 2 attempts)"), "{error}");
}
