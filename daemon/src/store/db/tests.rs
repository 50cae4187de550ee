//! The database against `Db::open_in_memory` (and a file where reopening
//! matters): migrations, the run, step and attempt rows, lineage, the
//! queries crash recovery and `gc` rely on.

use super::*;

#[test]
fn migrations_apply_once_and_runs_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.db");
    let mut db = Db::open(&path).unwrap();
    let id = db
        .batch(|b| {
            b.record_definition("d1", "p", "/p.toml", "name = 'p'")?;
            b.create_run(&NewRun {
                pipeline: "p",
                experiment: "p",
                definition: "d1",
                params: &serde_json::json!({"c": 0.5}),
                trigger: "cli",
                trigger_detail: None,
                no_reuse: false,
                status: RunStatus::Running,
                warnings: &[],
                module_pins: &Default::default(),
            })
        })
        .unwrap();
    drop(db);
    let db = Db::open(&path).unwrap();
    let run = db.read().run(id).unwrap().unwrap();
    assert_eq!(run.params["c"], 0.5);
    assert_eq!(run.status, RunStatus::Running);
}

#[test]
fn crashes_are_counted_and_an_abandoned_run_fails_with_its_running_steps() {
    let mut db = Db::open_in_memory().unwrap();
    let id = db
        .batch(|b| {
            b.record_definition("d1", "p", "/p.toml", "name = 'p'")?;
            let id = b.create_run(&NewRun {
                pipeline: "p",
                experiment: "p",
                definition: "d1",
                params: &serde_json::json!({}),
                trigger: "api",
                trigger_detail: None,
                no_reuse: false,
                status: RunStatus::Running,
                warnings: &[],
                module_pins: &Default::default(),
            })?;
            b.insert_step(id, "s", 0, "wasm", None)?;
            b.start_step(id, "s")?;
            b.start_attempt(id, "s", 1, "/log", false)?;
            Ok(id)
        })
        .unwrap();
    assert_eq!(db.read().run_crashes(id).unwrap(), 0);
    assert_eq!(db.read().record_crash(id, "stopped").unwrap(), 1);
    assert_eq!(db.read().record_crash(id, "stopped").unwrap(), 2);
    assert_eq!(
        db.read().run(id).unwrap().unwrap().status,
        RunStatus::Interrupted
    );
    db.batch(|b| b.fail_abandoned_run(id, "gave up")).unwrap();
    let run = db.read().run(id).unwrap().unwrap();
    assert_eq!(
        (run.status, run.error.as_deref()),
        (RunStatus::Failed, Some("gave up"))
    );
    let step = db.read().step(id, "s").unwrap().unwrap();
    assert_eq!(
        (step.status, step.error.as_deref()),
        (StepStatus::Failed, Some("gave up"))
    );
    assert_eq!(
        db.read().attempts(id, "s").unwrap()[0].status,
        AttemptStatus::Failed
    );
    assert_eq!(db.read().run_crashes(id).unwrap(), 2);
}

#[test]
fn foreign_keys_are_enforced() {
    let db = Db::open_in_memory().unwrap();
    let err = db
        .read()
        .record_step_output(42, "s", "o", "nope")
        .unwrap_err();
    assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
}

/// A running run of pipeline `p` (definition `d-p`).
fn new_run(b: &Batch<'_>, p: &str) -> Result<i64> {
    b.record_definition(&format!("d-{p}"), p, "/p.toml", "name = 'p'")?;
    b.create_run(&NewRun {
        pipeline: p,
        experiment: p,
        definition: &format!("d-{p}"),
        params: &serde_json::json!({}),
        trigger: "cli",
        trigger_detail: None,
        no_reuse: false,
        status: RunStatus::Running,
        warnings: &[],
        module_pins: &Default::default(),
    })
}

fn user_version(db: &Db) -> i64 {
    db.conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[test]
fn a_new_database_has_every_migration_and_a_newer_one_is_refused() {
    let db = Db::open_in_memory().unwrap();
    assert_eq!(user_version(&db), MIGRATIONS.len() as i64);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.db");
    let db = Db::open(&path).unwrap();
    let future = MIGRATIONS.len() as i64 + 1;
    db.conn.pragma_update(None, "user_version", future).unwrap();
    drop(db);
    match Db::open(&path) {
        Err(DbError::TooNew { found, known }) => {
            assert_eq!((found, known), (future, MIGRATIONS.len() as i64));
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a database from a newer millrace was opened"),
    }
}

#[test]
fn step_and_attempt_rows_round_trip() {
    let mut db = Db::open_in_memory().unwrap();
    let placement = Placement::Container(crate::model::ContainerPlacement {
        engine: "unix:///run/podman/podman.sock".into(),
        container: "millrace-1-s-1-x".into(),
        image: "alpine".into(),
        image_id: "sha256:abc".into(),
    });
    let run = db
        .batch(|b| {
            let run = new_run(b, "p")?;
            b.insert_step(run, "s", 0, "container", None)?;
            b.insert_step(run, "t", 1, "wasm", Some("m@1.0.0"))?;
            // Inserting a step twice keeps the first row (a resume re-records them).
            b.insert_step(run, "s", 5, "wasm", None)?;
            b.set_step_key(run, "s", "k1", &serde_json::json!({"code": "c1"}))?;
            b.start_step(run, "s")?;
            b.start_attempt(run, "s", 1, "/logs/s.1.log", false)?;
            b.set_attempt_placement(run, "s", 1, &placement)?;
            b.finish_attempt(run, "s", 1, AttemptStatus::Failed, Some(2), Some("exit 2"))?;
            b.start_attempt(run, "s", 2, "/logs/s.2.log", false)?;
            b.finish_attempt(run, "s", 2, AttemptStatus::Succeeded, Some(0), None)?;
            b.finish_step(run, "s", StepStatus::Succeeded, None, None)?;
            Ok(run)
        })
        .unwrap();
    let r = db.read();
    let steps = r.steps(run).unwrap();
    assert_eq!(
        steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["s", "t"]
    );
    let s = &steps[0];
    assert_eq!(
        (s.position, s.runtime.as_str(), s.status, s.attempts),
        (0, "container", StepStatus::Succeeded, 2)
    );
    assert_eq!(s.cache_key.as_deref(), Some("k1"));
    assert_eq!(s.key_parts, Some(serde_json::json!({"code": "c1"})));
    assert!(s.started_at.is_some() && s.finished_at >= s.started_at);
    let t = r.step(run, "t").unwrap().unwrap();
    assert_eq!(
        (t.status, t.module.as_deref()),
        (StepStatus::Pending, Some("m@1.0.0"))
    );
    assert!(r.step(run, "nope").unwrap().is_none());
    let attempts = r.attempts(run, "s").unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(
        (
            attempts[0].status,
            attempts[0].exit_code,
            attempts[0].error.as_deref()
        ),
        (AttemptStatus::Failed, Some(2), Some("exit 2"))
    );
    assert_eq!(attempts[0].placement.as_ref(), Some(&placement));
    assert_eq!(attempts[0].log_path.as_deref(), Some("/logs/s.1.log"));
    assert_eq!(attempts[1].status, AttemptStatus::Succeeded);
    assert_eq!(attempts[1].placement, None);
    assert_eq!(r.attempt_placement(run, "s", 1).unwrap(), Some(placement));
}

#[test]
fn a_restarted_attempt_keeps_its_placement_only_when_adopted() {
    let mut db = Db::open_in_memory().unwrap();
    let placement = Placement::Container(crate::model::ContainerPlacement {
        engine: "e".into(),
        container: "c".into(),
        image: "i".into(),
        image_id: "d".into(),
    });
    let run = db
        .batch(|b| {
            let run = new_run(b, "p")?;
            b.insert_step(run, "s", 0, "container", None)?;
            b.start_attempt(run, "s", 1, "/l", false)?;
            b.set_attempt_placement(run, "s", 1, &placement)?;
            Ok(run)
        })
        .unwrap();
    db.batch(|b| b.start_attempt(run, "s", 1, "/l", true))
        .unwrap();
    assert_eq!(
        db.read().attempt_placement(run, "s", 1).unwrap(),
        Some(placement)
    );
    db.batch(|b| b.start_attempt(run, "s", 1, "/l", false))
        .unwrap();
    assert_eq!(db.read().attempt_placement(run, "s", 1).unwrap(), None);
}

#[test]
fn lineage_names_who_produced_reused_and_read_an_artifact() {
    let mut db = Db::open_in_memory().unwrap();
    let (first, second) = db
        .batch(|b| {
            b.record_artifact("blob-in", 3, 1)?;
            b.record_artifact("blob-x", 10, 1)?;
            let first = new_run(b, "p")?;
            b.record_run_input(first, "a", "/data/a.txt", "blob-in")?;
            b.insert_step(first, "make", 0, "wasm", None)?;
            b.insert_step(first, "use", 1, "wasm", None)?;
            b.record_step_input(first, "make", "in", "inputs.a", "blob-in")?;
            b.record_step_output(first, "make", "out", "blob-x")?;
            b.finish_step(first, "make", StepStatus::Succeeded, None, None)?;
            b.record_step_input(first, "use", "x", "make.out", "blob-x")?;
            let second = new_run(b, "p")?;
            b.insert_step(second, "make", 0, "wasm", None)?;
            b.record_step_output(second, "make", "out", "blob-x")?;
            b.finish_step(second, "make", StepStatus::Reused, Some(first), None)?;
            Ok((first, second))
        })
        .unwrap();
    let rows: Vec<(i64, String, String, String, Option<i64>)> = db
        .read()
        .lineage("blob-x")
        .unwrap()
        .into_iter()
        .map(|l| (l.run_id, l.step, l.name, l.role, l.reused_from))
        .collect();
    assert_eq!(
        rows,
        [
            (first, "make".into(), "out".into(), "output".into(), None),
            (first, "use".into(), "x".into(), "input".into(), None),
            (
                second,
                "make".into(),
                "out".into(),
                "reused".into(),
                Some(first)
            ),
        ]
    );
    let roles: Vec<String> = db
        .read()
        .lineage("blob-in")
        .unwrap()
        .into_iter()
        .map(|l| l.role)
        .collect();
    assert_eq!(roles, ["pipeline input", "input"]);
    assert!(db.read().lineage("blob-none").unwrap().is_empty());
}

#[test]
fn the_previous_keyed_step_and_the_cache_entry_point_at_the_latest_execution() {
    let mut db = Db::open_in_memory().unwrap();
    let runs = db
        .batch(|b| {
            let mut runs = Vec::new();
            for key in [Some("k1"), Some("k2"), None] {
                let run = new_run(b, "p")?;
                b.insert_step(run, "s", 0, "wasm", None)?;
                if let Some(key) = key {
                    b.set_step_key(run, "s", key, &serde_json::json!({}))?;
                    b.set_cache_entry(key, run, "s")?;
                }
                runs.push(run);
            }
            Ok(runs)
        })
        .unwrap();
    let r = db.read();
    // The third run has no key yet: `explain` compares with the second.
    let prev = r.previous_step("p", "s", runs[2]).unwrap().unwrap();
    assert_eq!(
        (prev.run_id, prev.cache_key.as_deref()),
        (runs[1], Some("k2"))
    );
    assert_eq!(
        r.previous_step("p", "s", runs[1]).unwrap().unwrap().run_id,
        runs[0]
    );
    assert!(r.previous_step("p", "s", runs[0]).unwrap().is_none());
    assert!(r.previous_step("other", "s", runs[2]).unwrap().is_none());
    assert_eq!(r.cache_entry("k2").unwrap(), Some((runs[1], "s".into())));
    r.drop_cache_entry("k2").unwrap();
    assert_eq!(r.cache_entry("k2").unwrap(), None);
}

#[test]
fn recovery_finds_the_running_runs_and_counts_those_given_up() {
    let mut db = Db::open_in_memory().unwrap();
    let (a, b_run, done) = db
        .batch(|b| {
            let a = new_run(b, "p")?;
            let b_run = new_run(b, "q")?;
            let done = new_run(b, "p")?;
            b.set_run_status(done, RunStatus::Succeeded, None)?;
            Ok((a, b_run, done))
        })
        .unwrap();
    let running: Vec<i64> = db
        .read()
        .runs_with_status(RunStatus::Running)
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(running, [a, b_run]);
    let finished = db.read().run(done).unwrap().unwrap();
    assert!(finished.finished_at.is_some());
    // `a` stopped the process three times and is given up; `b_run` once, and is
    // resumed (interrupted, not failed).
    for _ in 0..3 {
        db.read().record_crash(a, "stopped").unwrap();
    }
    db.batch(|b| b.fail_abandoned_run(a, "gave up")).unwrap();
    assert_eq!(db.read().record_crash(b_run, "stopped").unwrap(), 1);
    assert_eq!(db.read().runs_given_up(3).unwrap(), 1);
    assert_eq!(db.read().runs_given_up(4).unwrap(), 0);
    assert!(
        db.read()
            .runs_with_status(RunStatus::Running)
            .unwrap()
            .is_empty()
    );
    let interrupted: Vec<i64> = db
        .read()
        .runs_with_status(RunStatus::Interrupted)
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(interrupted, [b_run]);
    assert_eq!(db.read().run_crashes(12345).unwrap(), 0);
}

#[test]
fn a_cancel_finishes_only_the_running_attempts() {
    let mut db = Db::open_in_memory().unwrap();
    let run = db
        .batch(|b| {
            let run = new_run(b, "p")?;
            for s in ["done", "busy"] {
                b.insert_step(run, s, 0, "wasm", None)?;
                b.start_attempt(run, s, 1, "/l", false)?;
            }
            b.finish_attempt(run, "done", 1, AttemptStatus::Succeeded, Some(0), None)?;
            Ok(run)
        })
        .unwrap();
    db.read().cancel_running_attempts(run).unwrap();
    let busy = &db.read().attempts(run, "busy").unwrap()[0];
    assert_eq!(
        (busy.status, busy.error.as_deref()),
        (AttemptStatus::Cancelled, Some("the run was cancelled"))
    );
    assert!(busy.finished_at.is_some());
    let done = &db.read().attempts(run, "done").unwrap()[0];
    assert_eq!(
        (done.status, done.error.as_deref()),
        (AttemptStatus::Succeeded, None)
    );
}

#[test]
fn gc_keeps_the_newest_runs_of_each_pipeline_and_the_running_ones() {
    let mut db = Db::open_in_memory().unwrap();
    let ids = db
        .batch(|b| {
            let mut ids = Vec::new();
            for p in ["p", "p", "p", "q"] {
                let id = new_run(b, p)?;
                b.set_run_status(id, RunStatus::Succeeded, None)?;
                ids.push(id);
            }
            // The oldest run of p is still running: kept whatever `--keep` says.
            b.set_run_status(ids[0], RunStatus::Running, None)?;
            b.record_artifact("orphan", 1, 1)?;
            b.record_artifact("kept", 1, 1)?;
            b.insert_step(ids[2], "s", 0, "wasm", None)?;
            b.record_step_output(ids[2], "s", "out", "kept")?;
            Ok(ids)
        })
        .unwrap();
    let mut keep = db.read().runs_to_keep(1).unwrap();
    keep.sort();
    assert_eq!(keep, [ids[0], ids[2], ids[3]]);
    let deleted = db.batch(|b| b.delete_runs_except(&keep)).unwrap();
    assert_eq!(deleted, 1);
    assert!(db.read().run(ids[1]).unwrap().is_none());
    assert_eq!(db.read().artifact("orphan").unwrap(), None);
    assert_eq!(db.read().artifact("kept").unwrap(), Some((1, 1)));
}
