//! The schema, as the migrations that build it. Append only: a database records
//! how many it has applied (`PRAGMA user_version`), so an edited migration never
//! reaches a database that already ran it.

/// Migrations, applied in order; `PRAGMA user_version` is the number applied.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE definitions (
    digest     TEXT PRIMARY KEY,
    pipeline   TEXT NOT NULL,
    path       TEXT NOT NULL,
    text       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline    TEXT NOT NULL,
    experiment  TEXT NOT NULL,
    definition  TEXT NOT NULL REFERENCES definitions(digest),
    params      TEXT NOT NULL,
    trigger     TEXT NOT NULL,
    no_reuse    INTEGER NOT NULL DEFAULT 0,
    status      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    started_at  INTEGER,
    finished_at INTEGER,
    error       TEXT
);
CREATE INDEX runs_by_pipeline ON runs(pipeline, id);
CREATE TABLE steps (
    run_id      INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    position    INTEGER NOT NULL,
    runtime     TEXT NOT NULL,
    status      TEXT NOT NULL,
    cache_key   TEXT,
    key_parts   TEXT,
    reused_from INTEGER,
    attempts    INTEGER NOT NULL DEFAULT 0,
    started_at  INTEGER,
    finished_at INTEGER,
    error       TEXT,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE attempts (
    run_id      INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step        TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    status      TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    exit_code   INTEGER,
    error       TEXT,
    log_path    TEXT,
    PRIMARY KEY (run_id, step, attempt)
);
CREATE TABLE artifacts (
    digest     TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    files      INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE run_inputs (
    run_id   INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    path     TEXT NOT NULL,
    artifact TEXT NOT NULL REFERENCES artifacts(digest),
    PRIMARY KEY (run_id, name)
);
CREATE TABLE step_inputs (
    run_id    INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step      TEXT NOT NULL,
    mount     TEXT NOT NULL,
    reference TEXT NOT NULL,
    artifact  TEXT NOT NULL REFERENCES artifacts(digest),
    PRIMARY KEY (run_id, step, mount)
);
CREATE INDEX step_inputs_by_artifact ON step_inputs(artifact);
CREATE TABLE step_outputs (
    run_id   INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step     TEXT NOT NULL,
    output   TEXT NOT NULL,
    artifact TEXT NOT NULL REFERENCES artifacts(digest),
    PRIMARY KEY (run_id, step, output)
);
CREATE INDEX step_outputs_by_artifact ON step_outputs(artifact);
CREATE TABLE cache_entries (
    key        TEXT PRIMARY KEY,
    run_id     INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE metrics (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step   TEXT NOT NULL,
    name   TEXT NOT NULL,
    value  REAL NOT NULL,
    idx    INTEGER,
    seq    INTEGER NOT NULL
);
CREATE INDEX metrics_by_run ON metrics(run_id, name);
CREATE TABLE stat_cache (
    path     TEXT PRIMARY KEY,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ino      INTEGER NOT NULL,
    digest   TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE runs ADD COLUMN trigger_detail TEXT;
CREATE INDEX runs_by_status ON runs(status, id);
-- The last firing of each cron trigger: catchup after a downtime counts from it.
CREATE TABLE trigger_state (
    pipeline   TEXT NOT NULL,
    trigger    TEXT NOT NULL,
    last_fired INTEGER NOT NULL,
    PRIMARY KEY (pipeline, trigger)
);
-- The content each watch trigger last saw, per matching file.
CREATE TABLE watch_cursor (
    pipeline TEXT NOT NULL,
    glob     TEXT NOT NULL,
    path     TEXT NOT NULL,
    digest   TEXT NOT NULL,
    PRIMARY KEY (pipeline, glob, path)
);
"#,
    r#"
-- The module registry: immutable versions, their status and its history.
CREATE TABLE modules (
    name         TEXT NOT NULL,
    version      TEXT NOT NULL,
    kind         TEXT NOT NULL,
    -- The code digest (the wasm blob, or the Python code tree) and the artifact
    -- (a tree) that keeps it in the store.
    digest       TEXT NOT NULL,
    artifact     TEXT NOT NULL,
    size         INTEGER NOT NULL,
    entry        TEXT,
    description  TEXT,
    status       TEXT NOT NULL DEFAULT 'active',
    message      TEXT,
    published_at INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE module_defaults (
    name    TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    set_at  INTEGER NOT NULL
);
CREATE TABLE module_events (
    name    TEXT NOT NULL,
    version TEXT NOT NULL,
    event   TEXT NOT NULL,
    message TEXT,
    at      INTEGER NOT NULL
);
CREATE INDEX module_events_by_module ON module_events(name, version);
-- The module version a step ran (`name@version`), for lineage and impact analysis.
ALTER TABLE steps ADD COLUMN module TEXT;
CREATE INDEX steps_by_module ON steps(module) WHERE module IS NOT NULL;
-- A run's warnings (deprecated modules) and the module versions its specs resolved to.
ALTER TABLE runs ADD COLUMN warnings TEXT;
ALTER TABLE runs ADD COLUMN module_pins TEXT;
"#,
    r#"
-- Where an attempt ran (JSON): a container's engine, name and image digest; a
-- Slurm job's id and node. Written before the work starts, so a restart finds it.
ALTER TABLE attempts ADD COLUMN placement TEXT;
"#,
    r#"
-- The stat cache compares ctime too (a rewrite with its mtime restored is not
-- unchanged). Rows from before have none and are hashed again once.
ALTER TABLE stat_cache ADD COLUMN ctime_ns INTEGER NOT NULL DEFAULT -1;
"#,
    r#"
-- How many times the process driving a run stopped (crash, kill) while the run was
-- running. A run that keeps killing its process is not resumed for ever: after the
-- third stop the daemon fails it instead of crash-looping (daemon::recover).
ALTER TABLE runs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
-- Which interpreter a Python step ran on (JSON, `snapshot::VariantRecord`): the
-- warm interpreter or the base runtime, and why the base. Written when an attempt
-- starts; null for other runtimes and for steps that did not run.
ALTER TABLE steps ADD COLUMN python TEXT;
"#,
    r#"
-- The items of `foreach` steps: one execution (or reuse) per top-level entry of
-- the step's foreach input, with its own cache key. An item's key finds an earlier
-- succeeded or reused item (of any run) whose outputs stand in for its own.
CREATE TABLE step_items (
    run_id      INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step        TEXT NOT NULL,
    item        TEXT NOT NULL,
    -- The item's own artifact: a tree holding only that entry.
    input       TEXT NOT NULL,
    cache_key   TEXT NOT NULL,
    status      TEXT NOT NULL,
    reused_from INTEGER,
    attempts    INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    started_at  INTEGER,
    finished_at INTEGER,
    PRIMARY KEY (run_id, step, item)
);
CREATE INDEX step_items_by_key ON step_items(cache_key, run_id);
CREATE TABLE item_outputs (
    run_id   INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step     TEXT NOT NULL,
    item     TEXT NOT NULL,
    output   TEXT NOT NULL,
    artifact TEXT NOT NULL,
    PRIMARY KEY (run_id, step, item, output)
);
CREATE INDEX item_outputs_by_artifact ON item_outputs(artifact);
"#,
];
