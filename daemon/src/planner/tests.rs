//! [`Planner::decide`] against a real store in a temporary directory: no step
//! runs; an earlier execution is written into the records as the scheduler
//! would write it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::definition::Environment;
use crate::model::{RunStatus, StepStatus};
use crate::store::db::NewRun;

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    pipeline: Arc<Pipeline>,
}

impl Fixture {
    /// `data/a.txt` and a fake wasm file beside a pipeline of `steps`.
    fn new(steps: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/a.txt"), "v1\n").unwrap();
        std::fs::write(dir.path().join("step.wasm"), b"\0asm not really").unwrap();
        let text = format!("name = \"p\"\n[inputs.a]\npath = \"data/a.txt\"\n{steps}");
        let (p, report) =
            crate::graph::parse(&dir.path().join("p.toml"), text, &Environment::default());
        let pipeline = Arc::new(p.unwrap_or_else(|| panic!("{report}")));
        let store = Arc::new(Store::open(&dir.path().join(".state")).unwrap());
        Fixture {
            dir,
            store,
            pipeline,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn planner(&self, no_reuse: bool) -> Planner {
        Planner::new(
            self.store.clone(),
            self.pipeline.clone(),
            Vec::new().into(),
            Arc::default(),
            Datastores::default(),
            no_reuse,
        )
    }

    /// The pipeline's inputs, hashed.
    fn known_inputs(&self) -> HashMap<String, String> {
        pipeline_inputs(
            &self.store,
            &Datastores::default(),
            &self.pipeline,
            &[],
            InputMode::Hash,
        )
        .unwrap()
    }

    /// What a run starting now knows: the inputs, no step settled.
    fn known(&self) -> Known {
        Known::new(self.known_inputs(), self.pipeline.steps.len())
    }

    /// Records run `n` in which step `i` executed under `key` and produced
    /// `outputs` (name → a file whose content becomes the artifact).
    fn record(&self, i: usize, key: &KeyParts, outputs: &[(&str, &Path)]) -> i64 {
        let digests: Vec<(String, String)> = outputs
            .iter()
            .map(|(o, path)| {
                let d = self.store.ingest(path, Mode::Copy).unwrap().digest;
                (o.to_string(), d)
            })
            .collect();
        let name = self.pipeline.steps[i].name.get_ref();
        self.store
            .db()
            .batch(|b| {
                let p = &self.pipeline;
                b.record_definition(&p.digest, "p", "p.toml", "")?;
                let run = b.create_run(&NewRun {
                    pipeline: "p",
                    experiment: "p",
                    definition: &p.digest,
                    params: &serde_json::json!({}),
                    trigger: "test",
                    trigger_detail: None,
                    no_reuse: false,
                    status: RunStatus::Running,
                    warnings: &[],
                    module_pins: &Default::default(),
                })?;
                b.insert_step(run, name, i, "wasm", None)?;
                b.set_step_key(run, name, &key.key(), &key.to_json())?;
                for (o, d) in &digests {
                    b.record_step_output(run, name, o, d)?;
                }
                b.set_cache_entry(&key.key(), run, name)?;
                b.finish_step(run, name, StepStatus::Succeeded, None, None)?;
                Ok(run)
            })
            .unwrap()
    }
}

const MAKE: &str = r#"
[[step]]
name = "make"
wasm = "step.wasm"
inputs = { x = "inputs.a" }
outputs = ["model"]
"#;

fn run_key(d: Decision) -> (KeyParts, Reason) {
    match d {
        Decision::Run { key, reason } => (key, reason),
        other => panic!("expected Run, got {other:?}"),
    }
}

#[test]
fn a_new_step_runs_and_an_intact_earlier_execution_is_reused() {
    let f = Fixture::new(MAKE);
    let planner = f.planner(false);
    let (key, reason) = run_key(planner.decide(0, &f.known()).unwrap());
    assert_eq!(reason, Reason::NotCached);
    assert_eq!(
        explain::why_run(&f.store, "p", "make", &key, &reason).unwrap(),
        "never ran before"
    );
    let run = f.record(0, &key, &[("model", &f.path("data/a.txt"))]);
    match planner.decide(0, &f.known()).unwrap() {
        Decision::Reuse { key: k, from } => {
            assert_eq!(k, key);
            assert_eq!((from.run, from.step.as_str()), (run, "make"));
            assert_eq!(from.outputs.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    // An edited input is a new key, explained against the earlier one.
    std::fs::write(f.path("data/a.txt"), "v2\n").unwrap();
    let (changed, reason) = run_key(planner.decide(0, &f.known()).unwrap());
    assert_ne!(changed.key(), key.key());
    let why = explain::why_run(&f.store, "p", "make", &changed, &reason).unwrap();
    assert!(why.starts_with("vs run 1: input `x` changed"), "{why}");
}

#[test]
fn reuse_false_and_no_reuse_run_even_with_a_cache_hit() {
    let f = Fixture::new(MAKE);
    let (key, _) = run_key(f.planner(false).decide(0, &f.known()).unwrap());
    f.record(0, &key, &[("model", &f.path("data/a.txt"))]);
    let (_, reason) = run_key(f.planner(true).decide(0, &f.known()).unwrap());
    assert_eq!(reason, Reason::NoReuse);
    let off = Fixture::new(&format!("{MAKE}reuse = false\n"));
    let (_, reason) = run_key(off.planner(false).decide(0, &off.known()).unwrap());
    assert_eq!(reason, Reason::ReuseOff);
}

#[test]
fn damaged_outputs_are_not_reused() {
    let f = Fixture::new(MAKE);
    let planner = f.planner(false);
    let (key, _) = run_key(planner.decide(0, &f.known()).unwrap());
    f.record(0, &key, &[("model", &f.path("data/a.txt"))]);
    // Every blob of the store removed: the recorded output is gone.
    crate::store::walk::remove_tree(&f.path(".state/objects/blobs")).unwrap();
    let (_, reason) = run_key(planner.decide(0, &f.known()).unwrap());
    assert_eq!(reason, Reason::NotCached);
    assert_eq!(
        explain::why_run(&f.store, "p", "make", &key, &reason).unwrap(),
        "same key as run 1, but its outputs are gone or damaged"
    );
}

#[test]
fn a_step_waits_for_an_unsettled_upstream_and_is_decided_once_it_settles() {
    let f = Fixture::new(&format!(
        "{MAKE}\n[[step]]\nname = \"use\"\nwasm = \"step.wasm\"\ninputs = {{ m = \"make.model\" }}\noutputs = [\"out\"]\n"
    ));
    let planner = f.planner(false);
    let mut known = f.known();
    assert_eq!(
        planner.decide(1, &known).unwrap(),
        Decision::Pending { upstream: vec![0] }
    );
    known.settle(0, [("model".to_string(), "d".repeat(64))]);
    let (key, _) = run_key(planner.decide(1, &known).unwrap());
    assert_eq!(key.inputs["m"], "d".repeat(64));
}

#[test]
fn a_step_whose_code_cannot_be_read_has_no_key() {
    let f = Fixture::new(MAKE);
    std::fs::remove_file(f.path("step.wasm")).unwrap();
    match f.planner(false).decide(0, &f.known()).unwrap() {
        Decision::Unkeyed { error } => {
            assert!(error.starts_with("cannot read the wasm file"), "{error}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_transfer_is_reused_only_while_its_destination_holds_the_artifact() {
    let f = Fixture::new(
        "[[step]]\nname = \"publish\"\ntransfer = { from = \"inputs.a\", to = \"models/latest\" }\n",
    );
    let planner = f.planner(false);
    let (key, _) = run_key(planner.decide(0, &f.known()).unwrap());
    f.record(0, &key, &[]);
    let dest = f.path("models/latest");
    // Not published (the destination is missing): it runs.
    let (_, reason) = run_key(planner.decide(0, &f.known()).unwrap());
    assert_eq!(
        reason,
        Reason::DestinationChanged {
            run: 1,
            destination: dest.clone()
        }
    );
    std::fs::create_dir_all(f.path("models")).unwrap();
    // A run snapshots its inputs into the store; the transfer publishes from there.
    f.store.ingest(&f.path("data/a.txt"), Mode::Copy).unwrap();
    crate::executor::transfer::publish(
        &f.store.artifacts,
        &key.inputs["from"],
        &dest,
        crate::definition::TransferMode::Replace,
    )
    .unwrap();
    assert!(matches!(
        planner.decide(0, &f.known()).unwrap(),
        Decision::Reuse { .. }
    ));
    // Changed by hand: it runs, and `plan` says why.
    std::fs::write(dest.join("a.txt"), "edited\n").unwrap();
    let (key, reason) = run_key(planner.decide(0, &f.known()).unwrap());
    assert!(matches!(reason, Reason::DestinationChanged { run: 1, .. }));
    assert_eq!(
        explain::why_run(&f.store, "p", "publish", &key, &reason).unwrap(),
        format!(
            "same key as run 1, but the destination {} no longer holds what it published",
            dest.display()
        )
    );
    // The dry walk and the decision are one: the plan says the same.
    let plan = planner.plan(f.known_inputs()).unwrap();
    assert!(
        matches!(&plan[..], [(s, Planned::Run { reason })] if s == "publish" && reason.contains("no longer holds")),
        "{plan:?}"
    );
}

#[test]
fn a_resumed_run_keeps_its_completed_steps_while_their_outputs_are_intact() {
    let f = Fixture::new(MAKE);
    let (key, _) = run_key(f.planner(false).decide(0, &f.known()).unwrap());
    let run = f.record(0, &key, &[("model", &f.path("data/a.txt"))]);
    // The cache entry would also do; the resumed step keeps its own outputs even
    // with --no-reuse.
    let resumed = f.planner(true).resuming(run, HashSet::from([0]));
    match resumed.decide(0, &f.known()).unwrap() {
        Decision::Reuse { from, .. } => assert_eq!((from.run, from.step.as_str()), (run, "make")),
        other => panic!("{other:?}"),
    }
    crate::store::walk::remove_tree(&f.path(".state/objects/blobs")).unwrap();
    let (_, reason) = run_key(resumed.decide(0, &f.known()).unwrap());
    assert_eq!(reason, Reason::LostSinceResume);
}
