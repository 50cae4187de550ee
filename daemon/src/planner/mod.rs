//! The planner answers "does step i run, under which key, and why". It reads the
//! store and never runs anything. [`Planner::decide`] is the only reuse decision:
//! `millrace plan` ([`Planner::plan`], a dry walk) and the run's scheduler both
//! call it, so a plan cannot promise a reuse that the run will not make.
//!
//! - [`key`]: the cache key's parts ([`KeyParts`]) and the container settings in it.
//! - [`code`]: what a step's code is, as a digest (memoised per run).
//! - [`inputs`]: the pipeline's inputs hashed or snapshotted, and what each step
//!   reads ([`Known`]).
//! - [`explain`]: why a step runs or ran, in the words `plan`, `millrace explain`,
//!   the API and the UI show.

pub mod code;
pub mod explain;
pub mod inputs;
pub mod key;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::config::Datastores;
use crate::definition::{ParamValue, Pipeline, StepKind, TransferMode};
use crate::executor::container::ResolvedImage;
use crate::graph::Graph;
use crate::store::Store;
use crate::store::artifacts::Mode;
use crate::store::db::{CachedItem, DbError};
use code::Memo;
pub use explain::{Explanation, Reason, explain};
pub use inputs::{InputMode, Known, pipeline_inputs};
pub use key::{
    ContainerSettings, KeyParts, container_command, container_settings_of, interpolated, key_parts,
    param_env, param_env_name, params_json, short,
};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("input `{name}`: {detail}")]
    Input { name: String, detail: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// An earlier execution whose outputs can stand in for a step's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reusable {
    pub run: i64,
    pub step: String,
    /// (output name, artifact digest), every one verified intact.
    pub outputs: Vec<(String, String)>,
}

/// What a step does, as [`Planner::decide`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The outputs of `from` stand in for the step's.
    Reuse { key: KeyParts, from: Reusable },
    /// The step executes under `key`; `reason` says why it is not reused.
    Run { key: KeyParts, reason: Reason },
    /// Decided once these upstream steps are settled: their outputs are not known
    /// yet (in a plan: they will run; unchanged outputs still allow reuse).
    Pending { upstream: Vec<usize> },
    /// The step has no key: its code cannot be read, or its image did not resolve.
    /// A run fails it without an attempt.
    Unkeyed { error: String },
    /// A `foreach` step: `key` is the step's (over the whole artifact), and each
    /// item is decided on its own key.
    Items { key: KeyParts, items: Vec<Item> },
}

/// One item of a `foreach` step: a top-level entry of its foreach input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The entry's name (`$MILLRACE_ITEM`).
    pub name: String,
    /// A tree holding only this entry: what the item's mount holds.
    pub input: String,
    /// The step's key parts with this item's tree in place of the whole artifact
    /// and `MILLRACE_ITEM` in the env: its key differs per item, and a change to
    /// one item changes no other's.
    pub key: KeyParts,
    /// `Some(reason)`: the item executes. `None`: `reused` stands in for it.
    pub run: Option<Reason>,
    /// The earlier item with this key: its run and outputs (all intact).
    pub reused: Option<CachedItem>,
}

/// One output of a `foreach` step: its items' merged, with the total size and
/// file count (the sums of theirs: a path two items hold is a conflict).
#[derive(Debug, Clone)]
pub struct Merged {
    pub output: String,
    pub digest: String,
    pub size: u64,
    pub files: u64,
}

/// The environment variable holding an item's name.
pub const ITEM_ENV: &str = "MILLRACE_ITEM";

/// What `plan` shows for one step (its JSON is `millrace plan --json`'s).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Planned {
    /// Outputs of an earlier execution with the same key are present and intact.
    Reuse { run: i64, step: String },
    /// Will execute; `reason` says why.
    Run { reason: String },
    /// Depends on a step that will execute: decided once that step's outputs exist
    /// (unchanged outputs still allow reuse).
    Pending { upstream: Vec<String> },
    /// A `foreach` step: how many items will execute and how many are reused,
    /// and the names of those that will execute.
    Items {
        executed: usize,
        reused: usize,
        run: Vec<String>,
    },
}

/// One pipeline's reuse decisions under one set of params.
pub struct Planner {
    store: Arc<Store>,
    pipeline: Arc<Pipeline>,
    graph: Graph,
    params: Arc<[(String, ParamValue)]>,
    /// Container steps' images, resolved before planning.
    images: Arc<HashMap<usize, Result<ResolvedImage, String>>>,
    datastores: Datastores,
    /// Shared with the run's attempts, which read the same code.
    memo: Arc<Memo>,
    no_reuse: bool,
    /// A resumed run, and its steps that completed before the resume.
    resumed: Option<(i64, HashSet<usize>)>,
    /// `[python]`: which interpreter Python steps start from (it is in their key).
    python: crate::config::Python,
}

impl Planner {
    pub fn new(
        store: Arc<Store>,
        pipeline: Arc<Pipeline>,
        params: Arc<[(String, ParamValue)]>,
        images: Arc<HashMap<usize, Result<ResolvedImage, String>>>,
        datastores: Datastores,
        no_reuse: bool,
    ) -> Planner {
        Planner {
            store,
            graph: Graph::new(&pipeline),
            pipeline,
            params,
            images,
            datastores,
            memo: Arc::default(),
            no_reuse,
            resumed: None,
            python: crate::config::Python::default(),
        }
    }

    /// Under the daemon's `[python]` settings (the default otherwise).
    pub fn with_python(mut self, python: crate::config::Python) -> Planner {
        self.python = python;
        self
    }

    /// For run `run`, in which the steps `completed` finished before a resume:
    /// they keep their own outputs while those are intact.
    pub fn resuming(mut self, run: i64, completed: HashSet<usize>) -> Planner {
        self.resumed = Some((run, completed));
        self
    }

    /// The code digests computed so far, shared with whoever reads the same code.
    pub fn memo(&self) -> Arc<Memo> {
        self.memo.clone()
    }

    /// Does step `i` run, under which key, and why. `known` holds what its
    /// upstream steps produced.
    pub fn decide(&self, i: usize, known: &Known) -> Result<Decision, PlanError> {
        let upstream: Vec<usize> = self.graph.deps[i]
            .iter()
            .copied()
            .filter(|&d| !known.is_settled(d))
            .collect();
        if !upstream.is_empty() {
            return Ok(Decision::Pending { upstream });
        }
        let Some(inputs) = known.step_inputs(&self.pipeline, i) else {
            // Settled upstream without an output this step reads.
            return Ok(Decision::Pending {
                upstream: self.graph.deps[i].clone(),
            });
        };
        let step = &self.pipeline.steps[i];
        let code = match code::code_of(
            &self.memo,
            &self.images,
            &self.store,
            &self.python,
            &self.pipeline,
            i,
        ) {
            Ok(c) => c,
            Err(error) => return Ok(Decision::Unkeyed { error }),
        };
        let key = key_parts(step, &self.params, &code, inputs);
        if let Some((run, completed)) = &self.resumed
            && completed.contains(&i)
        {
            return Ok(match self.reuse_own(*run, i) {
                Some(from) => Decision::Reuse { key, from },
                None => Decision::Run {
                    key,
                    reason: Reason::LostSinceResume,
                },
            });
        }
        if let Some(mount) = &step.foreach {
            return self.decide_items(i, key, mount.get_ref());
        }
        let reason = if !step.reuse {
            Reason::ReuseOff
        } else if self.no_reuse {
            Reason::NoReuse
        } else {
            match self.cached_outputs(i, &key.key())? {
                None => Reason::NotCached,
                Some(from) => match self.destination(i) {
                    // A transfer is reused only while the destination still holds
                    // the artifact.
                    Some(destination) if !self.holds(i, &destination, key.inputs.get("from")) => {
                        Reason::DestinationChanged {
                            run: from.run,
                            destination,
                        }
                    }
                    _ => return Ok(Decision::Reuse { key, from }),
                },
            }
        };
        Ok(Decision::Run { key, reason })
    }

    /// `millrace plan`: every step's decision, in graph order, without running
    /// anything. A step that will run settles nothing, so what reads its outputs
    /// is pending.
    pub fn plan(
        &self,
        inputs: HashMap<String, String>,
    ) -> Result<Vec<(String, Planned)>, PlanError> {
        let p = &self.pipeline;
        let mut known = Known::new(inputs, p.steps.len());
        let mut out = Vec::new();
        for &i in &self.graph.order {
            let name = p.steps[i].name.get_ref();
            let planned = match self.decide(i, &known)? {
                Decision::Reuse { from, .. } => {
                    let run = from.run;
                    known.settle(i, from.outputs);
                    Planned::Reuse {
                        run,
                        step: name.clone(),
                    }
                }
                Decision::Run { key, reason } => Planned::Run {
                    reason: explain::why_run(&self.store, p.name.get_ref(), name, &key, &reason)?,
                },
                Decision::Pending { upstream } => Planned::Pending {
                    upstream: upstream
                        .iter()
                        .map(|&d| p.steps[d].name.get_ref().clone())
                        .collect(),
                },
                Decision::Unkeyed { error } => Planned::Run { reason: error },
                Decision::Items { items, .. } => {
                    let run: Vec<String> = items
                        .iter()
                        .filter(|it| it.run.is_some())
                        .map(|it| it.name.clone())
                        .collect();
                    // Every item reused: the merged outputs are known, and what
                    // reads them can be decided.
                    if run.is_empty()
                        && let Ok(outs) = self.merge_items(i, &items)
                    {
                        known.settle(i, outs.into_iter().map(|m| (m.output, m.digest)));
                    }
                    Planned::Items {
                        executed: run.len(),
                        reused: items.len() - run.len(),
                        run,
                    }
                }
            };
            out.push((name.clone(), planned));
        }
        Ok(out)
    }

    /// A `foreach` step: each top-level entry of its foreach input (mounted at
    /// `mount`) decided on its own key. An input that is a single file has no
    /// entries to iterate over: the step fails, saying so.
    fn decide_items(&self, i: usize, key: KeyParts, mount: &str) -> Result<Decision, PlanError> {
        let step = &self.pipeline.steps[i];
        if let Some(error) = self.foreach_over_file(i, mount) {
            return Ok(Decision::Unkeyed { error });
        }
        let Some(whole) = key.inputs.get(mount) else {
            return Ok(Decision::Unkeyed {
                error: format!("foreach: input `{mount}` is not known"),
            });
        };
        let entries = match self.store.artifacts.items(whole) {
            Ok(e) => e,
            Err(e) => {
                return Ok(Decision::Unkeyed {
                    error: format!("foreach over `{mount}`: {e}"),
                });
            }
        };
        let mut items = Vec::with_capacity(entries.len());
        for (entry, tree) in entries {
            let mut k = key.clone();
            k.inputs.insert(mount.to_string(), tree.clone());
            k.env.insert(ITEM_ENV.to_string(), entry.name.clone());
            let (run, reused) = if !step.reuse {
                (Some(Reason::ReuseOff), None)
            } else if self.no_reuse {
                (Some(Reason::NoReuse), None)
            } else {
                match self.cached_item(&k.key())? {
                    Some(found) => (None, Some(found)),
                    None => (Some(Reason::NotCached), None),
                }
            };
            items.push(Item {
                name: entry.name,
                input: tree,
                key: k,
                run,
                reused,
            });
        }
        Ok(Decision::Items { key, items })
    }

    /// Why a `foreach` over mount `mount` of step `i` cannot iterate: its
    /// pipeline input is a file, not a directory. (A step output's artifact does
    /// not say whether it was a file: one written as a file is one item.)
    fn foreach_over_file(&self, i: usize, mount: &str) -> Option<String> {
        let step = &self.pipeline.steps[i];
        let (_, r) = step.inputs.iter().find(|(m, _)| m.get_ref() == mount)?;
        let crate::definition::Reference::Input(name) = r.get_ref() else {
            return None;
        };
        let input = self
            .pipeline
            .inputs
            .iter()
            .find(|x| x.name.get_ref() == name)?;
        let (datastore, rel) = self.pipeline.input_location(input, &self.params);
        let path = self
            .datastores
            .path(&datastore, &self.pipeline.dir)
            .join(rel);
        path.is_file().then(|| {
            format!(
                "foreach `inputs.{name}`: {} is a single file; foreach runs once per entry of a directory",
                path.display()
            )
        })
    }

    /// The outputs of an earlier item with this key, if all are intact.
    fn cached_item(&self, key: &str) -> Result<Option<CachedItem>, DbError> {
        let Some((run, outs)) = self.store.db().read().item_cache(key)? else {
            return Ok(None);
        };
        let all = outs.iter().all(|(_, d)| self.store.verify(d).is_ok());
        Ok(all.then_some((run, outs)))
    }

    /// A `foreach` step's outputs: per declared output, the union of its items'
    /// (output, merged digest, total size and files). `items` pairs each item's
    /// name with its outputs. Two items holding one path is an error naming both.
    pub fn merge_outputs(
        &self,
        i: usize,
        items: &[(String, Vec<(String, String)>)],
    ) -> Result<Vec<Merged>, String> {
        let mut out = Vec::new();
        for o in &self.pipeline.steps[i].outputs {
            let o = o.get_ref();
            let mut trees = Vec::with_capacity(items.len());
            let (mut size, mut files) = (0u64, 0u64);
            for (item, outs) in items {
                let Some((_, d)) = outs.iter().find(|(n, _)| n == o) else {
                    return Err(format!("item `{item}` has no output `{o}`"));
                };
                if let Ok(Some((s, f))) = self.store.db().read().artifact(d) {
                    size += s;
                    files += f;
                }
                trees.push((item.clone(), d.clone()));
            }
            let merged = self
                .store
                .artifacts
                .merge(&trees)
                .map_err(|e| format!("output `{o}`: {e}"))?;
            out.push(Merged {
                output: o.clone(),
                digest: merged,
                size,
                files,
            });
        }
        Ok(out)
    }

    /// [`Planner::merge_outputs`] of decided items that are all reused.
    fn merge_items(&self, i: usize, items: &[Item]) -> Result<Vec<Merged>, String> {
        let outs: Vec<(String, Vec<(String, String)>)> = items
            .iter()
            .filter_map(|it| Some((it.name.clone(), it.reused.as_ref()?.1.clone())))
            .collect();
        self.merge_outputs(i, &outs)
    }

    /// Where a transfer step publishes, under the run's params; `None` for any
    /// other step.
    pub fn destination(&self, i: usize) -> Option<PathBuf> {
        let (datastore, to) = self.pipeline.steps[i].transfer_location(&self.params)?;
        Some(
            self.datastores
                .path(&datastore, &self.pipeline.dir)
                .join(to),
        )
    }

    /// Whether transfer `i`'s `destination` still holds the artifact `digest`: a
    /// replace's is exactly the artifact; a merge's has every file of it, intact
    /// (and whatever else).
    fn holds(&self, i: usize, destination: &std::path::Path, digest: Option<&String>) -> bool {
        if let StepKind::Transfer {
            mode: TransferMode::Merge,
            ..
        } = &self.pipeline.steps[i].kind
        {
            return digest.is_some_and(|d| self.holds_merged(destination, d));
        }
        let current = destination
            .exists()
            .then(|| self.store.ingest(destination, Mode::Hash).ok())
            .flatten();
        current.map(|c| c.digest).as_ref() == digest
    }

    /// Whether every file of artifact `digest` is at `destination` as the artifact
    /// has it. The files hashed to find out go to the stat cache, so an unchanged
    /// destination is read once, then checked by stat.
    fn holds_merged(&self, destination: &std::path::Path, digest: &str) -> bool {
        let known = |path: &std::path::Path, stat: &crate::store::artifacts::FileStat| {
            self.store
                .db()
                .read()
                .stat_lookup(path, stat)
                .ok()
                .flatten()
        };
        match crate::executor::transfer::merged(&self.store.artifacts, digest, destination, &known)
        {
            Ok(hashed) => {
                if !hashed.is_empty() {
                    // A cache that could not be written costs a hash next time.
                    let _ = self.store.db().batch(|b| {
                        for (file, stat, d) in &hashed {
                            b.stat_record(file, stat, d)?;
                        }
                        Ok(())
                    });
                }
                true
            }
            Err(_) => false,
        }
    }

    /// The outputs of the execution a cache key points at, if all are intact.
    fn cached_outputs(&self, i: usize, key: &str) -> Result<Option<Reusable>, DbError> {
        let Some((run, step)) = self.store.db().read().cache_entry(key)? else {
            return Ok(None);
        };
        let outs = self.store.db().read().step_outputs(run, &step)?;
        if outs.len() != self.pipeline.steps[i].outputs.len() {
            return Ok(None);
        }
        for (_, digest) in &outs {
            if self.store.verify(digest).is_err() {
                return Ok(None);
            }
        }
        Ok(Some(Reusable {
            run,
            step,
            outputs: outs,
        }))
    }

    /// A step that completed in run `run` before a resume: its recorded outputs.
    fn reuse_own(&self, run: i64, i: usize) -> Option<Reusable> {
        let name = self.pipeline.steps[i].name.get_ref();
        let outs = self.store.db().read().step_outputs(run, name).ok()?;
        outs.iter()
            .all(|(_, d)| self.store.verify(d).is_ok())
            .then(|| Reusable {
                run,
                step: name.clone(),
                outputs: outs,
            })
    }
}

#[cfg(test)]
mod tests;
