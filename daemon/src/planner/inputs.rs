//! What the steps read: the pipeline's inputs as digests, hashed for a plan or
//! snapshotted into the store for a run, and each step's inputs by mount name.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use super::PlanError;
use crate::config::Datastores;
use crate::definition::{Input, ParamValue, Pipeline, Reference};
use crate::store::Store;
use crate::store::artifacts::Mode;

/// How [`pipeline_inputs`] reads the datasets.
#[derive(Debug, Clone, Copy)]
pub enum InputMode {
    /// `plan`: hashed, not stored, nothing recorded.
    Hash,
    /// Run `run`: copied into the store on first sight and recorded with the run.
    /// A resumed run keeps the inputs it started with.
    Snapshot { run: i64 },
}

/// The digest of every pipeline input, by name, its location resolved with the
/// run's `params` (the resolved host path is what a run records).
pub fn pipeline_inputs(
    store: &Store,
    datastores: &Datastores,
    p: &Pipeline,
    params: &[(String, ParamValue)],
    mode: InputMode,
) -> Result<HashMap<String, String>, PlanError> {
    let recorded: HashMap<String, String> = match mode {
        InputMode::Hash => HashMap::new(),
        InputMode::Snapshot { run } => store
            .db()
            .read()
            .run_inputs(run)?
            .into_iter()
            .map(|(n, _, d)| (n, d))
            .collect(),
    };
    let ingest_mode = match mode {
        InputMode::Hash => Mode::Hash,
        InputMode::Snapshot { .. } => Mode::Copy,
    };
    let mut out = HashMap::new();
    let mut snapshots = Vec::new();
    for input in &p.inputs {
        let name = input.name.get_ref();
        if let Some(d) = recorded.get(name)
            && store.verify(d).is_ok()
        {
            out.insert(name.clone(), d.clone());
            continue;
        }
        let path = input_path(store, datastores, p, input, params)?;
        let ingested = store
            .ingest(&path, ingest_mode)
            .map_err(|e| PlanError::Input {
                name: name.clone(),
                detail: e.to_string(),
            })?;
        // A resumed run keeps the data it started with: if its snapshot was
        // damaged, only identical content may take its place.
        if let Some(d) = recorded.get(name)
            && *d != ingested.digest
        {
            return Err(PlanError::Input {
                name: name.clone(),
                detail: format!(
                    "the snapshot this run started with is damaged and {} has changed since; start a new run",
                    path.display()
                ),
            });
        }
        snapshots.push((name, path.display().to_string(), ingested.digest.clone()));
        out.insert(name.clone(), ingested.digest);
    }
    if let InputMode::Snapshot { run } = mode {
        store.db().batch(|b| {
            for (name, path, digest) in &snapshots {
                b.record_run_input(run, name, path, digest)?;
            }
            Ok(())
        })?;
    }
    Ok(out)
}

/// Where a pipeline input lives on the host. It must exist, and must not hold
/// the state directory: a step would read the API token, the database and every
/// log, and the input would never be reused (the database changes under it).
fn input_path(
    store: &Store,
    datastores: &Datastores,
    p: &Pipeline,
    input: &Input,
    params: &[(String, ParamValue)],
) -> Result<PathBuf, PlanError> {
    let name = input.name.get_ref();
    let (datastore, rel) = p.input_location(input, params);
    let path = datastores.path(&datastore, &p.dir).join(rel);
    if !path.exists() {
        return Err(PlanError::Input {
            name: name.clone(),
            detail: format!("not found: {}", path.display()),
        });
    }
    if store.overlaps(&path) {
        return Err(PlanError::Input {
            name: name.clone(),
            detail: format!(
                "{} overlaps the state directory {} (it lies inside it or holds it): a step would see the API token, the database and the logs; point the input at data outside the state, or keep the state elsewhere (--state, MILLRACE_STATE)",
                path.display(),
                store.root.display()
            ),
        });
    }
    Ok(path)
}

/// The digests known so far: the pipeline's inputs and the outputs of the steps
/// that are settled (in a run: succeeded or reused; in a plan: reused).
#[derive(Debug, Clone)]
pub struct Known {
    inputs: HashMap<String, String>,
    outputs: HashMap<(usize, String), String>,
    settled: Vec<bool>,
}

impl Known {
    /// Nothing settled yet among `steps` steps.
    pub fn new(inputs: HashMap<String, String>, steps: usize) -> Known {
        Known {
            inputs,
            outputs: HashMap::new(),
            settled: vec![false; steps],
        }
    }

    /// Step `i` is done and produced `outputs` (output name, artifact digest).
    pub fn settle(&mut self, i: usize, outputs: impl IntoIterator<Item = (String, String)>) {
        for (o, d) in outputs {
            self.outputs.insert((i, o), d);
        }
        self.settled[i] = true;
    }

    pub fn is_settled(&self, i: usize) -> bool {
        self.settled.get(i).copied().unwrap_or(false)
    }

    /// The artifacts step `i`'s inputs resolve to, by mount name (a transfer's
    /// source is its single input, `from`). `None` if one is not known.
    pub fn step_inputs(&self, p: &Pipeline, i: usize) -> Option<BTreeMap<String, String>> {
        p.steps[i]
            .references()
            .map(|(mount, r)| {
                let digest = match r.get_ref() {
                    Reference::Input(name) => self.inputs.get(name)?.clone(),
                    Reference::Output { step, output } => {
                        let j = p.step_position(step)?;
                        self.outputs.get(&(j, output.clone()))?.clone()
                    }
                };
                Some((mount.to_string(), digest))
            })
            .collect()
    }
}
