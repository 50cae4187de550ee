//! One attempt of a step: the engine's side of the executor interface. The
//! sandbox directories are filled, the step becomes an [`AttemptSpec`], the
//! executor [`Executor::for_step`] picks runs it, and a success's outputs are
//! moved into the store; where it ran is recorded as the executor reports it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{
    RunContext, SNAPSHOTS, code_of, code_snapshot, file_digest, python_variant, remove_tree,
};
use crate::definition::{self, StepKind};
use crate::executor::container::{self, ResolvedImage};
use crate::executor::wasm::WasmRuntime;
use crate::executor::workspace::{self, Workspace, checked_size};
use crate::executor::{self, AttemptCtx, AttemptSpec, Executor, Label, LogFile, Mount};
use crate::model::Placement;
use crate::planner;
use crate::store::artifacts::Mode;

/// An attempt's outputs (name, digest), or its failure (exit code, message).
type Attempted = Result<Vec<(String, String)>, (Option<i32>, String)>;

/// What an attempt runs.
enum Program {
    Wasm(PathBuf),
    Python { code_dir: PathBuf, entry: PathBuf },
    Container(ResolvedImage),
}

impl RunContext {
    /// One attempt in a fresh sandbox directory; outputs are ingested only on
    /// success. `item`: the `foreach` item it executes (its mount then holds only
    /// that item).
    pub(super) async fn attempt(
        &self,
        i: usize,
        item: Option<&str>,
        attempt: u32,
        inputs: &BTreeMap<String, String>,
        log_path: &Path,
    ) -> Attempted {
        let step = &self.pipeline.steps[i];
        let program = match &step.kind {
            StepKind::Transfer { .. } => return self.attempt_transfer(i, attempt, inputs).await,
            StepKind::Wasm { resolved, .. } => Program::Wasm(resolved.clone()),
            StepKind::Module {
                resolved, module, ..
            } if module.kind == "wasm" => Program::Wasm(resolved.clone()),
            StepKind::Module { module, .. } if module.kind == "python" => {
                let code_dir = self
                    .materialised_code(&module.digest, attempt)
                    .map_err(|(c, e)| (c, format!("module {}: {e}", module.id)))?;
                Program::Python {
                    code_dir,
                    entry: PathBuf::from(module.entry.as_deref().unwrap_or_default()),
                }
            }
            StepKind::Python {
                code_dir, entry, ..
            } => {
                let digest = code_snapshot(&self.code_digests, self.store(), code_dir)
                    .map_err(|e| (None, e))?;
                Program::Python {
                    code_dir: self.materialised_code(&digest, attempt)?,
                    entry: PathBuf::from(entry),
                }
            }
            StepKind::Module { module, .. } => {
                return Err((
                    None,
                    format!("module {} is of unknown kind `{}`", module.id, module.kind),
                ));
            }
            StepKind::Container(_) => match self.images.get(&i) {
                Some(Ok(image)) => Program::Container(image.clone()),
                Some(Err(e)) => return Err((None, e.clone())),
                None => return Err((None, "the image was not resolved".into())),
            },
        };
        let mut ws = self
            .workspaces
            .take()
            .map_err(|e| (None, format!("cannot create the sandbox directories: {e}")))?;
        let result = self
            .attempt_in(&mut ws, i, item, attempt, &program, inputs, log_path)
            .await;
        self.workspaces.give_back(ws);
        result
    }

    /// A transfer's attempt: no sandbox, no guest, no log.
    async fn attempt_transfer(
        &self,
        i: usize,
        attempt: u32,
        inputs: &BTreeMap<String, String>,
    ) -> Attempted {
        let source = inputs.get("from").cloned().unwrap_or_default();
        let dest = self.transfer_destination(i);
        if self.engine.store.overlaps(&dest) {
            return Err((
                None,
                format!(
                    "transfer to {}: the destination overlaps the state directory {}; choose a path outside it",
                    dest.display(),
                    self.engine.store.root.display()
                ),
            ));
        }
        // The spec wants a log; a transfer writes none.
        let log = LogFile::create(Path::new("/dev/null"), 0)
            .map_err(|e| (None, format!("cannot open /dev/null: {e}")))?;
        let spec = AttemptSpec {
            program: executor::Program::Publish {
                from: source,
                to: dest,
                mode: match &self.pipeline.steps[i].kind {
                    crate::definition::StepKind::Transfer { mode, .. } => *mode,
                    _ => unreachable!("only transfers publish"),
                },
            },
            args: Vec::new(),
            env: Vec::new(),
            mounts: Vec::new(),
            memory: None,
            cpus: None,
            timeout: None,
            log,
            log_cap: 0,
            disk_cap: u64::MAX,
            walk: self.store().limits(),
        };
        let on_placement = |_: &Placement| {};
        let ctx = self.attempt_ctx(i, None, attempt, None, &on_placement);
        match Executor::Transfer.run(spec, &ctx).await {
            Ok(_) => Ok(Vec::new()),
            Err(e) => Err((None, e.to_string())),
        }
    }

    /// What an executor is lent for attempt `attempt` of step `i` (or of its item).
    fn attempt_ctx<'a>(
        &'a self,
        i: usize,
        item: Option<&str>,
        attempt: u32,
        wasm: Option<Arc<WasmRuntime>>,
        on_placement: &'a (dyn Fn(&Placement) + Send + Sync),
    ) -> AttemptCtx<'a> {
        let step = self.pipeline.steps[i].name.get_ref();
        let name = &super::items::row_name(step, item);
        // A Slurm job of this attempt that an earlier process submitted and did
        // not see end is adopted, not submitted again.
        let adopting = self
            .adopting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(i, attempt));
        let adopt = adopting
            .then(|| {
                self.store()
                    .db()
                    .read()
                    .attempt_placement(self.run_id, name, attempt)
                    .ok()
                    .flatten()
            })
            .flatten()
            .and_then(|p| match p {
                Placement::Slurm(p) => Some(p),
                _ => None,
            });
        let engine = self.engine.clone();
        AttemptCtx {
            label: Label {
                instance: self.engine.instance(),
                run: self.run_id,
                step: super::items::label_name(step, item),
                attempt,
            },
            on_placement,
            adopt,
            keep_on_drop: Arc::new(move || engine.is_draining()),
            wasm,
            containers: &self.engine.containers,
            artifacts: &self.engine.store.artifacts,
            work_dir: self.store().work_dir(self.run_id),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempt_in(
        &self,
        ws: &mut Workspace,
        i: usize,
        item: Option<&str>,
        attempt: u32,
        program: &Program,
        inputs: &BTreeMap<String, String>,
        log_path: &Path,
    ) -> Attempted {
        let step = &self.pipeline.steps[i];
        let name = &super::items::row_name(step.name.get_ref(), item);
        let fail = |e: String| (None, e);
        let log = LogFile::create(log_path, self.engine.config.log_cap)
            .map_err(|e| fail(format!("cannot create log {}: {e}", log_path.display())))?;
        // Renames and hard links only: cheap enough to do on the worker.
        (|| -> Result<(), String> {
            let mounts: Vec<&str> = inputs.keys().map(String::as_str).collect();
            let outputs: Vec<&str> = step.outputs.iter().map(|o| o.get_ref().as_str()).collect();
            ws.prepare(&mounts, &outputs)
                .map_err(|e| format!("sandbox directories: {e}"))?;
            for (mount, digest) in inputs {
                self.engine
                    .store
                    .artifacts
                    .materialise(digest, &ws.dir_in().join(mount))
                    .map_err(|e| format!("input `{mount}`: {e}"))?;
            }
            Ok(())
        })()
        .map_err(fail)?;
        let executor = Executor::for_step(step, &self.engine.config.computes);
        let secrets = self.staged_secrets(i, attempt, &log)?;
        let mut spec = self.attempt_spec(ws, i, item, attempt, program, log.clone())?;
        if let Some(staged) = &secrets {
            spec.mounts.push(Mount {
                host: staged.dir().to_path_buf(),
                guest: executor::secrets::GUEST_DIR.into(),
                writable: false,
            });
            for (var, secret) in &step.secret_env {
                let value = staged.env_value(secret.get_ref()).map_err(|e| {
                    log.note(&e);
                    fail(e)
                })?;
                spec.env.push((var.get_ref().clone(), value));
            }
        }
        let wasm = if executor.needs_wasm() {
            Some(self.engine.wasm().await.map_err(|e| fail(e.to_string()))?)
        } else {
            None
        };
        // Where the attempt runs is recorded as soon as the executor says.
        let on_placement = |p: &Placement| {
            let recorded =
                self.store()
                    .db()
                    .read()
                    .set_attempt_placement(self.run_id, name, attempt, p);
            if let Err(e) = recorded {
                tracing::error!(step = %name, error = %e, "cannot record where the step runs");
            }
        };
        let ctx = self.attempt_ctx(i, item, attempt, wasm, &on_placement);
        let outcome = self.engine.execute_attempt(&executor, spec, &ctx).await;
        // The guest is done: what the log held back for a secret split across
        // writes is written, and the staged values are removed.
        log.finish();
        drop(secrets);
        let outcome = outcome.map_err(|e| fail(log.redacted(&e.to_string())))?;
        tokio::task::block_in_place(|| {
            self.record_metrics(name, &ws.metrics_file(), &log);
            if let Some(f) = outcome.failure() {
                let message = log.redacted(&f.message);
                log.note(&format!("step failed: {message}"));
                return Err((f.exit_code, message));
            }
            self.captured_outputs(ws, i, &log)
        })
    }

    /// Step `i`'s secrets staged for this attempt, their values masked in its
    /// log from now on; `None` when it names none. A secret that cannot be read
    /// fails the attempt, naming the secret. (A Slurm job copies them into its
    /// staging directory, 0700 with the files' 0600, removed with the job's files.)
    fn staged_secrets(
        &self,
        i: usize,
        attempt: u32,
        log: &LogFile,
    ) -> Result<Option<executor::secrets::Staged>, (Option<i32>, String)> {
        let step = &self.pipeline.steps[i];
        if step.secrets.is_empty() {
            return Ok(None);
        }
        let failed = |e: String| {
            log.note(&e);
            (None, e)
        };
        let names: Vec<String> = step.secrets.iter().map(|s| s.get_ref().clone()).collect();
        let tag = format!("{}-{i}-{attempt}", self.run_id);
        let staged = executor::secrets::stage(&names, self.engine.config.secrets.as_ref(), &tag)
            .map_err(failed)?;
        log.redact(staged.redactions());
        Ok(Some(staged))
    }

    /// The spec of an attempt: the step's program, its interpolated arguments
    /// and environment beside the `MILLRACE_*` variables, the sandbox mounts.
    fn attempt_spec(
        &self,
        ws: &Workspace,
        i: usize,
        item: Option<&str>,
        attempt: u32,
        program: &Program,
        log: LogFile,
    ) -> Result<AttemptSpec, (Option<i32>, String)> {
        let step = &self.pipeline.steps[i];
        let name = step.name.get_ref();
        let fail = |e: String| (None, e);
        let (args, env) = planner::interpolated(step, &self.params);
        let mut full_env: Vec<(String, String)> = vec![
            ("MILLRACE_RUN_ID".into(), self.run_id.to_string()),
            (
                "MILLRACE_PIPELINE".into(),
                self.pipeline.name.get_ref().clone(),
            ),
            ("MILLRACE_STEP".into(), name.clone()),
            ("MILLRACE_ATTEMPT".into(), attempt.to_string()),
            ("MILLRACE_METRICS".into(), "/millrace/metrics.jsonl".into()),
            ("TMPDIR".into(), "/tmp".into()),
        ];
        if let Some(item) = item {
            full_env.push((planner::ITEM_ENV.into(), item.into()));
        }
        // Only the params the step uses, as in its key.
        full_env.extend(planner::param_env(step, &self.params));
        full_env.extend(env);
        let mount = |host: PathBuf, guest: &str, writable: bool| Mount {
            host,
            guest: guest.into(),
            writable,
        };
        // `${inputs.m}` and `${outputs.o}` expand to paths under these.
        let mut mounts = vec![
            mount(ws.dir_in(), definition::IN_DIR, false),
            mount(ws.dir_out(), definition::OUT_DIR, true),
            mount(ws.dir_tmp(), "/tmp", true),
            mount(ws.dir_meta(), "/millrace", true),
        ];
        let (program, args) = match program {
            Program::Container(image) => {
                let StepKind::Container(c) = &step.kind else {
                    return Err(fail("not a container step".into()));
                };
                let settings = planner::container_settings_of(step, &self.params)
                    .ok_or_else(|| fail("not a container step".into()))?;
                let launch = container::Launch {
                    image: image.clone(),
                    cmd: planner::container_command(step, &self.params, &args),
                    entrypoint: settings.entrypoint,
                    workdir: settings.workdir,
                    user: settings.user,
                    network: c.network,
                    read_only_root: c.read_only_root,
                };
                (executor::Program::Image(Box::new(launch)), args)
            }
            Program::Wasm(path) => {
                let argv0 = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| name.clone());
                let digest = code_of(
                    &self.code_digests,
                    &self.images,
                    self.store(),
                    &self.engine.config.python,
                    &self.pipeline,
                    i,
                )
                .map_err(fail)?;
                let program = executor::Program::Wasm {
                    path: path.clone(),
                    digest,
                    shared: false,
                };
                (program, std::iter::once(argv0).chain(args).collect())
            }
            Program::Python { code_dir, entry } => {
                let runtime = crate::executor::python::Runtime::locate()
                    .ok_or_else(|| fail(crate::executor::python::missing()))?;
                runtime.check().map_err(|e| fail(e.to_string()))?;
                // The variant the step's key named (the choice is memoised for the
                // run): the warm interpreter, or the base runtime.
                let (variant, _) = python_variant(
                    &self.code_digests,
                    self.store(),
                    &self.engine.config.python,
                    step,
                )
                .map_err(fail)?;
                log.note(&variant.note());
                // The step's record says which it was (`runs show`, `explain`, the
                // API); a failure to record it does not fail the step.
                let recorded =
                    self.store()
                        .db()
                        .read()
                        .set_step_python(self.run_id, name, &variant.record());
                if let Err(e) = recorded {
                    tracing::error!(step = %name, error = %e, "cannot record the Python variant");
                }
                let (path, digest) = match variant {
                    crate::executor::snapshot::Variant::Warm(s) => (s.wasm, s.content),
                    crate::executor::snapshot::Variant::Base(_) => (
                        runtime.wasm(),
                        file_digest(&self.code_digests, self.store(), &runtime.wasm())
                            .map_err(|e| fail(format!("the Python runtime: {e}")))?,
                    ),
                };
                // HOME: a fresh directory of this attempt's scratch space.
                std::fs::create_dir_all(ws.dir_tmp().join(".home"))
                    .map_err(|e| fail(format!("sandbox directories: {e}")))?;
                full_env.push(("HOME".into(), "/tmp/.home".into()));
                full_env.push(("PYTHONTZPATH".into(), String::new()));
                mounts.extend(runtime.mounts());
                mounts.push(mount(code_dir.clone(), "/code", false));
                // The runtime is at the same path on every Slurm node.
                let program = executor::Program::Wasm {
                    path,
                    digest,
                    shared: true,
                };
                (program, crate::executor::python::argv(entry, args))
            }
        };
        Ok(AttemptSpec {
            program,
            args,
            env: full_env,
            mounts,
            memory: step.memory,
            cpus: step.cpus,
            timeout: step.timeout,
            log,
            log_cap: self.engine.config.log_cap,
            disk_cap: self.engine.config.output_cap,
            walk: self.store().limits(),
        })
    }

    /// The declared outputs a succeeded attempt left in `/out`, within the cap,
    /// moved into the store; anything else there is discarded.
    fn captured_outputs(&self, ws: &Workspace, i: usize, log: &LogFile) -> Attempted {
        let step = &self.pipeline.steps[i];
        let dir_out = ws.dir_out();
        if let Ok(rd) = std::fs::read_dir(&dir_out) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !step.outputs.iter().any(|o| *o.get_ref() == n) {
                    log.note(&format!(
                        "/out/{} is not a declared output and was discarded",
                        crate::store::artifacts::escape_controls(&n)
                    ));
                }
            }
        }
        let mut size = 0u64;
        for o in &step.outputs {
            size += checked_size(
                &dir_out.join(o.get_ref()),
                &format!("output `{}`", o.get_ref()),
                self.store().limits(),
            )
            .map_err(|e| {
                log.note(&format!("step failed: {e}"));
                (None, e.to_string())
            })?;
        }
        if size > self.engine.config.output_cap {
            let msg = format!(
                "outputs hold {}, more than the cap of {} (MILLRACE_OUTPUT_CAP)",
                definition::format_size(size),
                definition::format_size(self.engine.config.output_cap)
            );
            log.note(&format!("step failed: {msg}"));
            return Err((None, msg));
        }
        let mut outs = Vec::new();
        for o in &step.outputs {
            let ingested = self
                .store()
                .ingest(&dir_out.join(o.get_ref()), Mode::Move)
                .map_err(|e| (None, format!("output `{}`: {e}", o.get_ref())))?;
            outs.push((o.get_ref().clone(), ingested.digest));
        }
        Ok(outs)
    }

    /// A code tree of the store, read-only in this run's work directory (hard links
    /// to the store's read-only blobs), shared by the run's steps.
    fn materialised_code(
        &self,
        digest: &str,
        attempt: u32,
    ) -> Result<PathBuf, (Option<i32>, String)> {
        let code_dir = self
            .engine
            .store
            .work_dir(self.run_id)
            .join("code")
            .join(digest);
        if code_dir.is_dir() {
            return Ok(code_dir);
        }
        let part = code_dir.with_extension(format!(
            "part{attempt}-{}",
            SNAPSHOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = remove_tree(&part);
        tokio::task::block_in_place(|| {
            self.engine.store.artifacts.materialise(digest, &part)?;
            match std::fs::rename(&part, &code_dir) {
                // Another step of this run put it there first.
                Err(_) if code_dir.is_dir() => {
                    let _ = remove_tree(&part);
                    Ok(())
                }
                r => r.map_err(|e| crate::store::artifacts::ArtifactError::Io {
                    path: code_dir.clone(),
                    source: e,
                }),
            }
        })
        .map_err(|e| (None, format!("the code: {e}")))?;
        Ok(code_dir)
    }

    /// Records the metrics the step wrote (see [`workspace::read_metrics`]).
    fn record_metrics(&self, step: &str, path: &Path, log: &LogFile) {
        let Some(rows) = workspace::read_metrics(path, log) else {
            return;
        };
        let result = self.store().db().batch(|b| {
            b.clear_metrics(self.run_id, step)?;
            for (seq, m) in rows.iter().enumerate() {
                b.record_metric(self.run_id, step, &m.name, m.value, m.index, seq as i64)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            log.note(&format!("cannot record metrics: {e}"));
        }
    }
}
