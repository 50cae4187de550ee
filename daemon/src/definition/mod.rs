//! Pipeline files: TOML text → [`Pipeline`], with a span on everything a later error
//! may point at. Every mistake in a file is collected, none stops the walk.
//!
//! The walk is by hand over `toml`'s spanned document (not serde with
//! `deny_unknown_fields`) because serde stops at the first error and we report all.
//! Checks that need the whole pipeline (references, cycles) come after, in
//! [`crate::graph`], whose `load` and `parse` read a pipeline file completely.
//!
//! Split by what it walks: this file holds the pipeline and its top-level tables
//! (name, concurrency, inputs); `params.rs`, `triggers.rs`, `steps.rs` and
//! `container.rs` walk theirs; `values.rs` holds the string forms (references,
//! interpolation, sizes, durations); `walker.rs` the typed-value helpers the daemon
//! config walk shares.

mod container;
mod params;
mod paths;
mod steps;
#[cfg(test)]
mod tests;
mod triggers;
mod values;
mod walker;

pub use container::ContainerStep;
pub use params::{Param, ParamValue, check_param_value};
pub use paths::resolve;
pub use triggers::{Catchup, Trigger, TriggerKind};
pub use values::{
    Piece, format_size, interpolate, interpolation_pieces, parse_duration, parse_reference,
    parse_size,
};
pub(crate) use walker::{Value, Walker, is_identifier, valid_env_name};

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use toml::de::DeTable;

use crate::diagnostic::{Diagnostic, SourceFile, Span};

use walker::{NameRule, valid_name};

pub type Sp<T> = Spanned<T>;

/// One pipeline file, checked key by key.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// `name = "…"`; default: the file stem.
    pub name: Sp<String>,
    pub description: Option<String>,
    /// `experiment = "…"`: groups runs for comparison; default: the name.
    pub experiment: String,
    pub concurrency: Concurrency,
    /// `[params]`: typed defaults, in file order.
    pub params: Vec<Param>,
    /// `[inputs.NAME]`: datasets, hashed by content.
    pub inputs: Vec<Input>,
    /// `[[trigger]]`: parsed and checked here, fired by the daemon.
    pub triggers: Vec<Trigger>,
    /// `[[step]]`, in file order.
    pub steps: Vec<Step>,
    /// The directory relative paths resolve against.
    pub dir: PathBuf,
    /// BLAKE3 of the file's bytes: the version of the pipeline a run used.
    pub digest: String,
    /// The datastores the daemon config declared when the file was read: what a
    /// templated `datastore = "${params.x}"` may resolve to.
    pub datastores: Vec<String>,
    /// Step name → index in `steps` (the first step of a name).
    step_index: std::collections::HashMap<String, usize>,
    /// Input name → index in `inputs`.
    input_index: std::collections::HashMap<String, usize>,
}

#[derive(Debug, Clone)]
pub struct Concurrency {
    pub max_runs: u32,
    pub overlap: Overlap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    Queue,
    Skip,
    Cancel,
}

/// `[inputs.NAME]`: a file or directory in a datastore.
#[derive(Debug, Clone)]
pub struct Input {
    pub name: Sp<String>,
    /// As written, relative to the datastore.
    pub path: Sp<String>,
    pub datastore: Sp<String>,
}

/// `[[step]]`.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: Sp<String>,
    /// The span of the whole `[[step]]` table.
    pub span: Span,
    pub kind: StepKind,
    pub args: Vec<Sp<String>>,
    pub env: Vec<(Sp<String>, Sp<String>)>,
    /// `params = ["c"]`: params the step reads without interpolating them.
    pub params: Vec<Sp<String>>,
    /// Every param the step uses, sorted: those it names in `params` and those
    /// interpolated into its args, env, container settings, the paths of the
    /// inputs it reads and its transfer destination. Only these enter its key
    /// and its environment (see [`Step::scoped_params`]).
    pub uses: Vec<String>,
    /// `inputs = { mount = "reference" }`, mounted at `/in/<mount>`.
    pub inputs: Vec<(Sp<String>, Sp<Reference>)>,
    /// `outputs = [...]`, captured from `/out/<name>`.
    pub outputs: Vec<Sp<String>>,
    /// `after = ["step"]`: ordering without data.
    pub after: Vec<Sp<String>>,
    pub timeout: Option<Duration>,
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub retries: Retries,
    pub reuse: bool,
    pub compute: Option<Sp<String>>,
    /// `secrets = ["db"]`: daemon-config secrets the step reads at
    /// `/run/secrets/NAME`. Names only: a value is never part of a definition.
    pub secrets: Vec<Sp<String>>,
    /// `secret_env = { DB_PASSWORD = "db" }`: variable → one of `secrets`.
    pub secret_env: Vec<(Sp<String>, Sp<String>)>,
    /// `foreach = "inputs.inbox"`: the mount (one of `inputs`) whose artifact's
    /// top-level entries are the step's items, each executed alone at that mount.
    pub foreach: Option<Sp<String>>,
}

#[derive(Debug, Clone, Copy)]
pub struct Retries {
    /// Total attempts, at least 1.
    pub attempts: u32,
    /// Wait before the second attempt; doubled for each further one.
    pub backoff: Duration,
}

/// What a step runs. Only `Wasm` and `Transfer` execute in this version; the others
/// are parsed and checked so the error names what is missing.
#[derive(Debug, Clone)]
pub enum StepKind {
    /// `wasm = "plugins/x.wasm"`, resolved against the pipeline's directory.
    Wasm { path: Sp<String>, resolved: PathBuf },
    /// `python = "scripts/train.py"` (the script's directory is the code) or
    /// `python = { script = "train.py", code = "src/" }`.
    Python {
        script: Sp<String>,
        /// Mounted read-only at `/code` and put on `sys.path`.
        code_dir: PathBuf,
        /// The script, relative to `code_dir`.
        entry: String,
        /// `snapshot = false`: start the base runtime, not the warm interpreter.
        snapshot: bool,
    },
    /// `container = { image, command, entrypoint, env, workdir, user, network,
    /// read_only_root }`: an OS image through the Docker Engine API.
    Container(Box<ContainerStep>),
    /// `module = "name@req"`, resolved against the registry when checked.
    Module {
        spec: Sp<String>,
        module: ModuleRef,
        /// The code in the store: the wasm blob (or the Python code tree).
        resolved: PathBuf,
    },
    /// `transfer = { from, to, datastore, mode }`: copy an artifact into a datastore.
    Transfer {
        from: Sp<Reference>,
        to: Sp<String>,
        datastore: Sp<String>,
        mode: TransferMode,
    },
}

/// How a transfer meets what its destination holds (`transfer.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransferMode {
    /// The destination becomes the artifact, whole (one atomic swap).
    #[default]
    Replace,
    /// The artifact's files are written into the destination, each atomically;
    /// files it does not hold are left alone.
    Merge,
}

impl TransferMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferMode::Replace => "replace",
            TransferMode::Merge => "merge",
        }
    }
}

impl StepKind {
    pub fn runtime_name(&self) -> &'static str {
        match self {
            StepKind::Wasm { .. } => "wasm",
            StepKind::Python { .. } => "python",
            StepKind::Container { .. } => "container",
            StepKind::Module { module, .. } if module.kind == "python" => "python",
            StepKind::Module { .. } => "wasm",
            StepKind::Transfer { .. } => "transfer",
        }
    }
}

/// The module version a `module = "…"` step resolved to.
#[derive(Debug, Clone)]
pub struct ModuleRef {
    /// `name@version`.
    pub id: String,
    pub digest: String,
    /// `wasm` or `python`.
    pub kind: String,
    /// The entry script of a Python module.
    pub entry: Option<String>,
    /// Set when the version is deprecated.
    pub warning: Option<String>,
}

/// A data reference: `inputs.NAME` or `STEP.OUTPUT`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Input(String),
    Output { step: String, output: String },
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Input(name) => write!(f, "inputs.{name}"),
            Reference::Output { step, output } => write!(f, "{step}.{output}"),
        }
    }
}

/// What a file is checked against that is not in the file: the datastores and
/// compute targets the daemon config declares.
#[derive(Debug, Clone)]
pub struct Environment {
    /// Datastore names; `default` is always present.
    pub datastores: Vec<String>,
    /// Where the datastores are (none: each is the pipeline's directory, as for
    /// `millrace run` without a config). A watch must look inside one of them.
    pub datastore_paths: crate::config::Datastores,
    /// Compute target name → kind (`local`, `container`, `slurm`).
    pub computes: std::collections::BTreeMap<String, String>,
    /// The module registry `module = "…"` resolves against.
    pub modules: std::sync::Arc<crate::module::ModuleIndex>,
    /// The `[secrets.NAME]` of the daemon config; `None` when checked without
    /// one, so a step's `secrets` cannot be checked (and is refused, saying so).
    pub secrets: Option<Vec<String>>,
}

impl Default for Environment {
    fn default() -> Self {
        Environment {
            datastores: vec!["default".into()],
            datastore_paths: Default::default(),
            computes: [("local".to_string(), "local".to_string())].into(),
            modules: Default::default(),
            secrets: None,
        }
    }
}

/// Where a step's inputs are mounted in its sandbox (`/in/MOUNT`), for every
/// runtime: what `${inputs.MOUNT}` expands to, and the engine's mount list.
pub const IN_DIR: &str = "/in";
/// Where a step writes its outputs (`/out/NAME`): what `${outputs.NAME}` expands to.
pub const OUT_DIR: &str = "/out";

/// The longest debounce, backoff or grace period (and step timeout).
pub(crate) const MAX_TIMER: Duration = Duration::from_secs(366 * 24 * 3600);

/// The longest `watch` glob, in characters (a path pattern; PATH_MAX is 4096 bytes).
pub const MAX_GLOB_CHARS: usize = 1024;

/// Largest linear memory a wasm32 guest can address.
pub const WASM32_MAX_MEMORY: u64 = 4 << 30;

/// Walks a pipeline file's text: every mistake in its keys and values, each at
/// its span. The checks that need the whole pipeline (references, cycles) come
/// after, in [`crate::graph::parse`], which is what readers of pipeline files call.
/// `path` names the file in diagnostics and anchors relative paths.
pub fn walk(
    path: &Path,
    text: String,
    env: &Environment,
) -> (Option<Pipeline>, SourceFile, Vec<Diagnostic>) {
    let source = SourceFile::new(path, text);
    crate::diagnostic::reset_hint_budget();
    let mut w = Walker { diags: Vec::new() };
    let (doc, errors) = DeTable::parse_recoverable(&source.text);
    for e in &errors {
        let span = e.span().unwrap_or(0..0);
        w.diags.push(Diagnostic::error(
            span,
            format!("invalid TOML: {}", e.message().trim()),
        ));
    }
    let pipeline = if errors.is_empty() {
        w.pipeline(doc.get_ref(), path, &source.text, env)
    } else {
        None
    };
    (pipeline, source, w.diags)
}

const PIPELINE_KEYS: &[&str] = &[
    "name",
    "description",
    "experiment",
    "concurrency",
    "params",
    "inputs",
    "trigger",
    "step",
];

impl Walker {
    fn pipeline(
        &mut self,
        doc: &DeTable<'_>,
        path: &Path,
        text: &str,
        env: &Environment,
    ) -> Option<Pipeline> {
        self.unknown_keys(doc, PIPELINE_KEYS, "the pipeline file");
        // `retrain_churn.toml` without a `name` is the pipeline `retrain-churn`.
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_ascii_lowercase().replace('_', "-"))
            .unwrap_or_default();
        let name = match doc.get("name").and_then(|v| self.string(v, "name")) {
            Some(n) => {
                self.name(&n, "pipeline name", NameRule::Pipeline);
                n
            }
            None => {
                if !valid_name(&stem, NameRule::Pipeline) {
                    self.error(
                        0..0,
                        format!("the pipeline has no `name` and its file stem `{stem}` is not a valid name"),
                    );
                }
                Spanned::new(0..0, stem)
            }
        };
        let description = doc
            .get("description")
            .and_then(|v| self.string(v, "description"))
            .map(|s| s.into_inner());
        let experiment = doc
            .get("experiment")
            .and_then(|v| self.string(v, "experiment"))
            .map(|e| {
                self.name(&e, "experiment", NameRule::Pipeline);
                e.into_inner()
            })
            .unwrap_or_else(|| name.get_ref().clone());
        let concurrency = doc
            .get("concurrency")
            .map(|v| self.concurrency(v))
            .unwrap_or(Concurrency {
                max_runs: 1,
                overlap: Overlap::Queue,
            });
        let params = doc
            .get("params")
            .map(|v| self.params(v))
            .unwrap_or_default();
        let inputs = doc
            .get("inputs")
            .map(|v| self.inputs(v, env))
            .unwrap_or_default();
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let triggers = match doc.get("trigger") {
            Some(v) => self
                .array_of_tables(v, "trigger")
                .iter()
                .filter_map(|t| self.trigger(t, text, &params, &dir, env))
                .collect(),
            None => Vec::new(),
        };
        for t in &triggers {
            if let TriggerKind::After { pipeline } = &t.kind
                && pipeline.get_ref() == name.get_ref()
            {
                self.error(
                    pipeline.span(),
                    format!(
                        "`after = \"{}\"` is this pipeline itself: each run would start the next, forever",
                        pipeline.get_ref()
                    ),
                );
            }
        }
        let steps: Vec<Step> = match doc.get("step") {
            Some(v) => self
                .array_of_tables(v, "step")
                .iter()
                .filter_map(|t| self.step(t, text, &params, &dir, env))
                .collect(),
            None => Vec::new(),
        };
        if doc.get("step").is_none() {
            self.error(
                0..0,
                "the pipeline has no steps: add at least one `[[step]]`",
            );
        }
        let mut step_index = std::collections::HashMap::with_capacity(steps.len());
        for (i, s) in steps.iter().enumerate() {
            step_index.entry(s.name.get_ref().clone()).or_insert(i);
        }
        let input_index = inputs
            .iter()
            .enumerate()
            .map(|(i, x)| (x.name.get_ref().clone(), i))
            .collect();
        let mut pipeline = Pipeline {
            step_index,
            input_index,
            name,
            description,
            experiment,
            concurrency,
            params,
            inputs,
            triggers,
            steps,
            dir,
            digest: blake3::hash(text.as_bytes()).to_hex().to_string(),
            datastores: env.datastores.clone(),
        };
        self.scope(&mut pipeline, text);
        self.code_beside_data(&pipeline, env);
        self.params_read_but_not_used(&pipeline);
        Some(pipeline)
    }

    fn concurrency(&mut self, v: &Value<'_>) -> Concurrency {
        let mut c = Concurrency {
            max_runs: 1,
            overlap: Overlap::Queue,
        };
        let Some(t) = self.table(v, "concurrency") else {
            return c;
        };
        self.unknown_keys(t, &["max_runs", "overlap"], "concurrency");
        if let Some(m) = t
            .get("max_runs")
            .and_then(|v| self.integer(v, "concurrency.max_runs"))
        {
            if !(1..=1000).contains(&m) {
                self.error(
                    t["max_runs"].span(),
                    format!("max_runs must be between 1 and 1000, got {m}"),
                );
            } else {
                c.max_runs = m as u32;
            }
        }
        if let Some(o) = t
            .get("overlap")
            .and_then(|v| self.string(v, "concurrency.overlap"))
        {
            c.overlap = match o.get_ref().as_str() {
                "queue" => Overlap::Queue,
                "skip" => Overlap::Skip,
                "cancel" => Overlap::Cancel,
                other => {
                    self.error(
                        o.span(),
                        format!("unknown overlap `{other}`: expected queue, skip or cancel"),
                    );
                    Overlap::Queue
                }
            };
        }
        c
    }

    fn inputs(&mut self, v: &Value<'_>, env: &Environment) -> Vec<Input> {
        let Some(t) = self.table(v, "inputs") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in t {
            let name = Spanned::new(k.span(), k.get_ref().to_string());
            self.name(&name, "input name", NameRule::Identifier);
            let what = format!("inputs.{}", name.get_ref());
            let Some(t) = self.table(v, &what) else {
                continue;
            };
            self.unknown_keys(
                t,
                &["path", "datastore", "description"],
                &format!("[{what}]"),
            );
            let path = match t.get("path") {
                Some(p) => self.string(p, &format!("{what}.path")),
                None => {
                    self.error(v.span(), format!("[{what}] needs a `path`"));
                    None
                }
            };
            let datastore = t
                .get("datastore")
                .and_then(|d| self.string(d, &format!("{what}.datastore")))
                .unwrap_or_else(|| Spanned::new(k.span(), "default".into()));
            // A templated name is checked once resolved (see `paths`).
            if !paths::templated(datastore.get_ref()) {
                self.datastore(&datastore, env);
            }
            if let Some(path) = path {
                if path.get_ref().is_empty() {
                    self.error(path.span(), format!("{what}.path is empty"));
                }
                out.push(Input {
                    name,
                    path,
                    datastore,
                });
            }
        }
        out
    }

    fn datastore(&mut self, d: &Sp<String>, env: &Environment) {
        if !env.datastores.iter().any(|s| s == d.get_ref()) {
            self.diags.push(
                Diagnostic::error(d.span(), format!("unknown datastore `{}`", d.get_ref()))
                    .with_help(format!(
                        "datastores: {} (declared in the daemon config)",
                        env.datastores.join(", ")
                    )),
            );
        }
    }
}

impl Step {
    /// Every data reference of the step with the name it is read under: its
    /// `inputs` by mount name, or a transfer's `from` (as `from`).
    pub fn references(&self) -> impl Iterator<Item = (&str, &Sp<Reference>)> {
        let transfer = match &self.kind {
            StepKind::Transfer { from, .. } => Some(("from", from)),
            _ => None,
        };
        self.inputs
            .iter()
            .map(|(m, r)| (m.get_ref().as_str(), r))
            .chain(transfer)
    }
}

impl Pipeline {
    /// Module spec → `name@version` for every `module = "…"` step.
    pub fn module_pins(&self) -> std::collections::BTreeMap<String, String> {
        self.steps
            .iter()
            .filter_map(|s| match &s.kind {
                StepKind::Module { spec, module, .. } => Some((
                    spec.get_ref().clone(),
                    module.id.split_once('@').map_or("", |(_, v)| v).to_string(),
                )),
                _ => None,
            })
            .collect()
    }

    /// Warnings a run of this pipeline records (deprecated modules).
    pub fn warnings(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter_map(|s| match &s.kind {
                StepKind::Module {
                    module:
                        ModuleRef {
                            warning: Some(w), ..
                        },
                    ..
                } => Some(format!("step `{}`: {w}", s.name.get_ref())),
                _ => None,
            })
            .collect()
    }

    pub fn step(&self, name: &str) -> Option<&Step> {
        self.step_position(name).map(|i| &self.steps[i])
    }

    pub fn step_position(&self, name: &str) -> Option<usize> {
        self.step_index.get(name).copied()
    }

    pub fn input(&self, name: &str) -> Option<&Input> {
        self.input_index.get(name).map(|&i| &self.inputs[i])
    }
}
