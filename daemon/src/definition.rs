//! Pipeline files: TOML text → [`Pipeline`], with a span on everything a later error
//! may point at. Every mistake in a file is collected, none stops the walk.
//!
//! The walk is by hand over `toml`'s spanned document (not serde with
//! `deny_unknown_fields`) because serde stops at the first error and we report all.
//! Checks that need the whole pipeline (references, cycles) come after, in
//! [`crate::graph`], whose `load` and `parse` read a pipeline file completely.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diagnostic::{Diagnostic, SourceFile, Span, closest, display_path};

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

#[derive(Debug, Clone)]
pub struct Param {
    pub name: Sp<String>,
    pub value: ParamValue,
}

/// A param's typed value. Its text form is what `${params.x}` expands to.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    String(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl ParamValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            ParamValue::String(_) => "string",
            ParamValue::Integer(_) => "integer",
            ParamValue::Float(_) => "float",
            ParamValue::Bool(_) => "boolean",
        }
    }

    /// Parses `text` as a value of the same type as `self` (for `--param k=v`).
    pub fn parse_like(&self, text: &str) -> Result<ParamValue, String> {
        let bad = || format!("expected {}, got `{text}`", self.type_name());
        Ok(match self {
            ParamValue::String(_) => ParamValue::String(text.to_string()),
            ParamValue::Integer(_) => ParamValue::Integer(text.trim().parse().map_err(|_| bad())?),
            ParamValue::Float(_) => {
                let f: f64 = text.trim().parse().map_err(|_| bad())?;
                if !f.is_finite() {
                    return Err(bad());
                }
                ParamValue::Float(f)
            }
            ParamValue::Bool(_) => ParamValue::Bool(text.trim().parse().map_err(|_| bad())?),
        })
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ParamValue::String(s) => s.clone().into(),
            ParamValue::Integer(i) => (*i).into(),
            ParamValue::Float(f) => (*f).into(),
            ParamValue::Bool(b) => (*b).into(),
        }
    }
}

impl std::fmt::Display for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamValue::String(s) => f.write_str(s),
            ParamValue::Integer(i) => write!(f, "{i}"),
            // Debug keeps the `.0` of whole floats, so 1.0 stays "1.0".
            ParamValue::Float(x) => write!(f, "{x:?}"),
            ParamValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// `[inputs.NAME]`: a file or directory in a datastore.
#[derive(Debug, Clone)]
pub struct Input {
    pub name: Sp<String>,
    /// As written, relative to the datastore.
    pub path: Sp<String>,
    pub datastore: Sp<String>,
}

#[derive(Debug, Clone)]
pub struct Trigger {
    pub span: Span,
    pub kind: TriggerKind,
    pub params: Vec<(Sp<String>, ParamValue)>,
}

impl Trigger {
    /// The cron schedule of a `cron` trigger (a checked pipeline's parses).
    pub fn schedule(&self) -> Option<crate::trigger::cron::Schedule> {
        match &self.kind {
            TriggerKind::Cron { expr, timezone, .. } => crate::trigger::cron::Schedule::parse(
                expr.get_ref(),
                timezone.as_ref().map(|z| z.get_ref().as_str()),
            )
            .ok(),
            _ => None,
        }
    }

    /// The trigger's `params`, as `--param`-style text overrides.
    pub fn param_overrides(&self) -> Vec<(String, String)> {
        self.params
            .iter()
            .map(|(k, v)| (k.get_ref().clone(), v.to_string()))
            .collect()
    }
}

#[derive(Debug, Clone)]
pub enum TriggerKind {
    Cron {
        expr: Sp<String>,
        timezone: Option<Sp<String>>,
        catchup: Catchup,
    },
    Watch {
        glob: Sp<String>,
        debounce: Duration,
    },
    After {
        pipeline: Sp<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Catchup {
    None,
    Latest,
    All,
    Coalesce,
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
    /// `transfer = { from, to, datastore }`: copy an artifact into a datastore.
    Transfer {
        from: Sp<Reference>,
        to: Sp<String>,
        datastore: Sp<String>,
    },
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

/// What a `container = {…}` step runs. `command` (then the step's `args`) replaces
/// the image's CMD; the image's own ENTRYPOINT stays unless `entrypoint` is given.
#[derive(Debug, Clone)]
pub struct ContainerStep {
    pub image: Sp<String>,
    pub command: Option<Vec<Sp<String>>>,
    pub entrypoint: Option<Vec<Sp<String>>>,
    /// Added to the step's `env` (which wins on a clash).
    pub env: Vec<(Sp<String>, Sp<String>)>,
    pub workdir: Option<Sp<String>>,
    /// `uid[:gid]` or a name the image knows; default: the daemon's uid:gid.
    pub user: Option<Sp<String>>,
    /// `network = true`: a network (the engine's default bridge) instead of none.
    pub network: bool,
    /// `read_only_root = false`: the image's root filesystem writable.
    pub read_only_root: bool,
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
    /// Compute target name → kind (`local`, `container`, `slurm`).
    pub computes: std::collections::BTreeMap<String, String>,
    /// The module registry `module = "…"` resolves against.
    pub modules: std::sync::Arc<crate::module::ModuleIndex>,
}

impl Default for Environment {
    fn default() -> Self {
        Environment {
            datastores: vec!["default".into()],
            computes: [("local".to_string(), "local".to_string())].into(),
            modules: Default::default(),
        }
    }
}

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
const STEP_KEYS: &[&str] = &[
    "name",
    "description",
    "wasm",
    "python",
    "container",
    "module",
    "transfer",
    "compute",
    "args",
    "env",
    "inputs",
    "outputs",
    "after",
    "timeout",
    "memory",
    "cpus",
    "retries",
    "reuse",
];
const STEP_KINDS: &[&str] = &["wasm", "python", "container", "module", "transfer"];

pub(crate) type Value<'i> = Spanned<DeValue<'i>>;

/// Walks a spanned TOML document, collecting every diagnostic (also used for the
/// daemon config).
pub(crate) struct Walker {
    pub(crate) diags: Vec<Diagnostic>,
}

impl Walker {
    pub(crate) fn error(&mut self, span: Span, message: impl Into<String>) {
        self.diags.push(Diagnostic::error(span, message));
    }

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
        let triggers = match doc.get("trigger") {
            Some(v) => self
                .array_of_tables(v, "trigger")
                .iter()
                .filter_map(|t| self.trigger(t, &params))
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
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
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
        Some(Pipeline {
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
        })
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

    fn params(&mut self, v: &Value<'_>) -> Vec<Param> {
        let Some(t) = self.table(v, "params") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in t {
            let name = Spanned::new(k.span(), k.get_ref().to_string());
            self.name(&name, "param name", NameRule::Identifier);
            if let Some(value) = self.param_value(v, &format!("params.{}", name.get_ref())) {
                out.push(Param { name, value });
            }
        }
        out
    }

    fn param_value(&mut self, v: &Value<'_>, what: &str) -> Option<ParamValue> {
        Some(match v.get_ref() {
            DeValue::String(s) => {
                // The same rule as for a value given on the command line or the API.
                if let Err(e) = check_param_value(what.trim_start_matches("params."), s) {
                    self.error(v.span(), e);
                    return None;
                }
                ParamValue::String(s.to_string())
            }
            DeValue::Integer(i) => {
                match i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()) {
                    Ok(i) => ParamValue::Integer(i),
                    Err(_) => {
                        self.error(v.span(), format!("{what}: integer out of range"));
                        return None;
                    }
                }
            }
            DeValue::Float(f) => match f.as_str().replace('_', "").parse::<f64>() {
                Ok(x) if x.is_finite() => ParamValue::Float(x),
                _ => {
                    self.error(v.span(), format!("{what}: a param must be a finite number"));
                    return None;
                }
            },
            DeValue::Boolean(b) => ParamValue::Bool(*b),
            other => {
                self.error(
                    v.span(),
                    format!(
                        "{what}: a param must be a string, integer, float or boolean, not {}",
                        other.type_str()
                    ),
                );
                return None;
            }
        })
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
            self.datastore(&datastore, env);
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

    fn trigger(&mut self, v: &Value<'_>, params: &[Param]) -> Option<Trigger> {
        let t = self.table(v, "trigger")?;
        let kinds: Vec<&str> = ["cron", "watch", "after"]
            .into_iter()
            .filter(|k| t.contains_key(*k))
            .collect();
        let allowed: &[&str] = match kinds.as_slice() {
            ["cron"] => &["cron", "timezone", "catchup", "params"],
            ["watch"] => &["watch", "debounce", "params"],
            ["after"] => &["after", "params"],
            [] => {
                self.error(
                    v.span(),
                    "a [[trigger]] needs one of `cron`, `watch` or `after`",
                );
                return None;
            }
            _ => {
                self.error(
                    v.span(),
                    format!("a [[trigger]] has exactly one of `cron`, `watch` or `after`, this one has {}", kinds.join(" and ")),
                );
                return None;
            }
        };
        self.unknown_keys(t, allowed, "[[trigger]]");
        let trigger_params = match t.get("params") {
            Some(p) => self.param_overrides(p, params, "trigger params"),
            None => Vec::new(),
        };
        let kind = if let Some(c) = t.get("cron") {
            let expr = self.string(c, "cron")?;
            let timezone = t.get("timezone").and_then(|z| self.string(z, "timezone"));
            use crate::trigger::cron::{Schedule, ScheduleError};
            match Schedule::parse(expr.get_ref(), timezone.as_ref().map(|z| z.get_ref().as_str())) {
                Ok(_) => {}
                Err(ScheduleError::Expr(e)) => {
                    self.diags.push(Diagnostic::error(expr.span(), e).with_help(
                        "minute hour day-of-month month day-of-week, e.g. \"0 3 * * *\"; 6 fields put seconds first",
                    ))
                }
                Err(ScheduleError::Timezone(e)) => {
                    let span = timezone.as_ref().map(|z| z.span()).unwrap_or(expr.span());
                    self.error(span, e);
                }
            }
            let catchup = match t.get("catchup").and_then(|c| self.string(c, "catchup")) {
                None => Catchup::None,
                Some(c) => {
                    match c.get_ref().as_str() {
                        "none" => Catchup::None,
                        "latest" => Catchup::Latest,
                        "all" => Catchup::All,
                        "coalesce" => Catchup::Coalesce,
                        other => {
                            self.error(
                            c.span(),
                            format!("unknown catchup `{other}`: expected none, latest, all or coalesce"),
                        );
                            Catchup::None
                        }
                    }
                }
            };
            TriggerKind::Cron {
                expr,
                timezone,
                catchup,
            }
        } else if let Some(g) = t.get("watch") {
            let glob = self.string(g, "watch")?;
            // Bounded before it is compiled: globset panics when a glob's regex
            // exceeds the regex size limit (a megabyte-long glob, found by
            // fuzzing).
            let chars = glob.get_ref().chars().count();
            if chars > MAX_GLOB_CHARS {
                self.error(
                    glob.span(),
                    format!("the watch glob has {chars} characters, more than the limit of {MAX_GLOB_CHARS}"),
                );
            } else if let Err(e) = crate::trigger::watch::check_glob(glob.get_ref()) {
                self.error(glob.span(), e);
            }
            let debounce = t
                .get("debounce")
                .and_then(|d| self.timer_duration(d, "debounce"))
                .unwrap_or(Duration::from_secs(2));
            TriggerKind::Watch { glob, debounce }
        } else {
            let pipeline = self.string(&t["after"], "after")?;
            self.name(&pipeline, "pipeline name", NameRule::Pipeline);
            TriggerKind::After { pipeline }
        };
        Some(Trigger {
            span: v.span(),
            kind,
            params: trigger_params,
        })
    }

    /// `params = { k = v }` overriding declared params with values of the same type.
    fn param_overrides(
        &mut self,
        v: &Value<'_>,
        params: &[Param],
        what: &str,
    ) -> Vec<(Sp<String>, ParamValue)> {
        let Some(t) = self.table(v, what) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in t {
            let Some(declared) = params.iter().find(|p| p.name.get_ref() == k.get_ref()) else {
                let known: Vec<&str> = params.iter().map(|p| p.name.get_ref().as_str()).collect();
                self.diags.push(
                    Diagnostic::error(k.span(), format!("unknown param `{}`", k.get_ref()))
                        .with_help(declared_list("params", &known)),
                );
                continue;
            };
            if let Some(value) = self.param_value(v, &format!("params.{}", k.get_ref())) {
                let compatible = std::mem::discriminant(&value)
                    == std::mem::discriminant(&declared.value)
                    || matches!(
                        (&declared.value, &value),
                        (ParamValue::Float(_), ParamValue::Integer(_))
                    );
                if !compatible {
                    self.error(
                        v.span(),
                        format!(
                            "param `{}` is declared as {}, this is {}",
                            k.get_ref(),
                            declared.value.type_name(),
                            value.type_name()
                        ),
                    );
                    continue;
                }
                let value = match (&declared.value, value) {
                    (ParamValue::Float(_), ParamValue::Integer(i)) => ParamValue::Float(i as f64),
                    (_, v) => v,
                };
                out.push((Spanned::new(k.span(), k.get_ref().to_string()), value));
            }
        }
        out
    }

    fn step(
        &mut self,
        v: &Value<'_>,
        text: &str,
        params: &[Param],
        dir: &Path,
        env: &Environment,
    ) -> Option<Step> {
        let t = self.table(v, "step")?;
        self.unknown_keys(t, STEP_KEYS, "[[step]]");
        let name = match t.get("name") {
            Some(n) => {
                let n = self.string(n, "step name")?;
                self.name(&n, "step name", NameRule::Identifier);
                n
            }
            None => {
                self.error(v.span(), "a [[step]] needs a `name`");
                return None;
            }
        };
        let step_name = name.get_ref().clone();
        let kinds: Vec<&str> = STEP_KINDS
            .iter()
            .copied()
            .filter(|k| t.contains_key(*k))
            .collect();
        let kind = match kinds.as_slice() {
            [one] => self.step_kind(one, &t[*one], &step_name, dir, env),
            [] => {
                self.diags.push(
                    Diagnostic::error(name.span(), format!("step `{step_name}` does not say what to run"))
                        .with_help("add one of: wasm = \"x.wasm\", python = \"x.py\", container = {…}, module = \"name@version\", transfer = {…}"),
                );
                None
            }
            [_, second, ..] => {
                self.error(
                    t[*second].span(),
                    format!("step `{step_name}` has both `{}` and `{second}`: a step runs exactly one thing", kinds[0]),
                );
                None
            }
        };
        let args = match t.get("args") {
            Some(a) => self.string_array(a, "args"),
            None => Vec::new(),
        };
        for a in &args {
            self.interpolation(a, text, params);
        }
        let env_vars = match t.get("env") {
            Some(e) => self.string_table(e, "env"),
            None => Vec::new(),
        };
        for (k, v) in &env_vars {
            self.interpolation(v, text, params);
            if !valid_env_name(k.get_ref()) {
                self.error(
                    k.span(),
                    format!("`{}` is not a valid environment variable name", k.get_ref()),
                );
            } else if k.get_ref().starts_with("MILLRACE_") {
                self.error(
                    k.span(),
                    format!(
                        "`{}`: the MILLRACE_ prefix is reserved for variables millrace sets",
                        k.get_ref()
                    ),
                );
            }
        }
        let mut inputs = Vec::new();
        if let Some(i) = t.get("inputs") {
            for (mount, r) in self.string_table(i, "inputs") {
                self.name(&mount, "input mount name", NameRule::Identifier);
                if let Some(r) = self.reference(&r) {
                    inputs.push((mount, r));
                }
            }
        }
        let outputs = match t.get("outputs") {
            Some(o) => self.string_array(o, "outputs"),
            None => Vec::new(),
        };
        let mut seen = HashSet::new();
        for o in &outputs {
            self.name(o, "output name", NameRule::Identifier);
            if !seen.insert(o.get_ref().clone()) {
                self.error(
                    o.span(),
                    format!(
                        "output `{}` is declared twice in step `{step_name}`",
                        o.get_ref()
                    ),
                );
            }
        }
        let after = match t.get("after") {
            Some(a) => self.string_array(a, "after"),
            None => Vec::new(),
        };
        let timeout = t.get("timeout").and_then(|d| self.duration(d, "timeout"));
        if let (Some(d), Some(v)) = (timeout, t.get("timeout"))
            && (d.is_zero() || d > MAX_TIMER)
        {
            self.error(
                v.span(),
                "timeout must be greater than zero and at most a year",
            );
        }
        let memory = t.get("memory").and_then(|m| self.size(m, "memory"));
        if let (
            Some(m),
            Some(StepKind::Wasm { .. } | StepKind::Python { .. } | StepKind::Module { .. }),
        ) = (memory, &kind)
            && m > WASM32_MAX_MEMORY
        {
            self.error(
                t["memory"].span(),
                format!(
                    "memory {}: a wasm32 sandbox can address at most 4GiB",
                    format_size(m)
                ),
            );
        }
        let cpus = match t.get("cpus") {
            Some(c) => match c.get_ref() {
                DeValue::Integer(_) | DeValue::Float(_) => {
                    let x: f64 = match c.get_ref() {
                        DeValue::Integer(i) => {
                            i64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
                                .map_or(-1.0, |n| n as f64)
                        }
                        DeValue::Float(f) => f.as_str().replace('_', "").parse().unwrap_or(-1.0),
                        _ => -1.0,
                    };
                    if !(x > 0.0 && x <= 1024.0) {
                        self.error(c.span(), "cpus must be a number greater than 0");
                    }
                    Some(x)
                }
                other => {
                    self.error(
                        c.span(),
                        format!("cpus must be a number, not {}", other.type_str()),
                    );
                    None
                }
            },
            None => None,
        };
        let retries = t
            .get("retries")
            .map(|r| self.retries(r))
            .unwrap_or(Retries {
                attempts: 1,
                backoff: Duration::from_secs(1),
            });
        let reuse = t
            .get("reuse")
            .and_then(|r| self.boolean(r, "reuse"))
            .unwrap_or(true);
        let compute = t.get("compute").and_then(|c| self.string(c, "compute"));
        if let Some(c) = &compute {
            match env.computes.get(c.get_ref()).map(String::as_str) {
                None => self.diags.push(
                    Diagnostic::error(c.span(), format!("unknown compute `{}`", c.get_ref()))
                        .with_help(format!(
                            "compute targets: {} (declared in the daemon config)",
                            env.computes.keys().cloned().collect::<Vec<_>>().join(", ")
                        )),
                ),
                Some("container") if !matches!(kind, Some(StepKind::Container(_)) | None) => self
                    .error(
                        c.span(),
                        format!(
                            "compute `{}` is a container engine: only `container` steps run there",
                            c.get_ref()
                        ),
                    ),
                Some("slurm") if matches!(kind, Some(StepKind::Container(_))) => self.error(
                    c.span(),
                    format!(
                        "compute `{}` is a Slurm cluster: container steps do not run on Slurm in this version (wasm, python and module steps do)",
                        c.get_ref()
                    ),
                ),
                Some(_) => {}
            }
        }
        if let Some(StepKind::Transfer { .. }) = &kind {
            for key in [
                "args", "env", "outputs", "timeout", "memory", "cpus", "compute",
            ] {
                if let Some(v) = t.get(key) {
                    self.error(
                        v.span(),
                        format!("`{key}` does not apply to a transfer step"),
                    );
                }
            }
            if let Some(i) = t.get("inputs") {
                self.error(
                    i.span(),
                    "a transfer step takes its input from `transfer.from`, not `inputs`",
                );
            }
        }
        Some(Step {
            name,
            span: v.span(),
            kind: kind?,
            args,
            env: env_vars,
            inputs,
            outputs,
            after,
            timeout,
            memory,
            cpus,
            retries,
            reuse,
            compute,
        })
    }

    fn step_kind(
        &mut self,
        kind: &str,
        v: &Value<'_>,
        step: &str,
        dir: &Path,
        env: &Environment,
    ) -> Option<StepKind> {
        match kind {
            "wasm" => {
                let path = self.string(v, "wasm")?;
                let resolved = dir.join(path.get_ref());
                if !path.get_ref().ends_with(".wasm") {
                    self.error(
                        path.span(),
                        format!("`{}` is not a .wasm file", path.get_ref()),
                    );
                } else if !resolved.is_file() {
                    self.diags.push(
                        Diagnostic::error(
                            path.span(),
                            format!("wasm file not found: {}", display_path(&resolved)),
                        )
                        .with_help("paths are relative to the pipeline file's directory"),
                    );
                }
                Some(StepKind::Wasm { path, resolved })
            }
            "python" => {
                let mut snapshot = true;
                let (script, code) = match v.get_ref() {
                    DeValue::Table(t) => {
                        self.unknown_keys(t, &["script", "code", "snapshot"], "python");
                        if let Some(b) = t
                            .get("snapshot")
                            .and_then(|b| self.boolean(b, "python.snapshot"))
                        {
                            snapshot = b;
                        }
                        let Some(script) = t
                            .get("script")
                            .and_then(|s| self.string(s, "python.script"))
                        else {
                            if !t.contains_key("script") {
                                self.error(v.span(), "python needs a `script`");
                            }
                            return None;
                        };
                        let code = t.get("code").and_then(|c| self.string(c, "python.code"));
                        (script, code)
                    }
                    _ => (self.string(v, "python")?, None),
                };
                let (code_dir, entry) = match &code {
                    Some(c) => (dir.join(c.get_ref()), script.get_ref().clone()),
                    None => {
                        let full = Path::new(script.get_ref());
                        (
                            dir.join(full.parent().unwrap_or(Path::new(""))),
                            full.file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default(),
                        )
                    }
                };
                if let Some(c) = &code
                    && !code_dir.is_dir()
                {
                    self.error(
                        c.span(),
                        format!("code directory not found: {}", display_path(&code_dir)),
                    );
                } else if !entry.ends_with(".py")
                    || Path::new(&entry)
                        .components()
                        .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    self.error(
                        script.span(),
                        format!(
                            "`{}` is not a .py script inside the code directory",
                            script.get_ref()
                        ),
                    );
                } else if !code_dir.join(&entry).is_file() {
                    self.diags.push(
                        Diagnostic::error(
                            script.span(),
                            format!(
                                "python script not found: {}",
                                display_path(&code_dir.join(&entry))
                            ),
                        )
                        .with_help("paths are relative to the pipeline file's directory (a `script` to its `code`)"),
                    );
                }
                Some(StepKind::Python {
                    script,
                    code_dir,
                    entry,
                    snapshot,
                })
            }
            "container" => {
                let t = self.table(v, "container")?;
                self.unknown_keys(
                    t,
                    &[
                        "image",
                        "command",
                        "entrypoint",
                        "env",
                        "workdir",
                        "user",
                        "network",
                        "read_only_root",
                    ],
                    "container",
                );
                let image = match t
                    .get("image")
                    .and_then(|i| self.string(i, "container.image"))
                {
                    Some(i) if i.get_ref().trim().is_empty() => {
                        self.error(i.span(), "container.image is empty");
                        None
                    }
                    Some(i) => Some(i),
                    None => {
                        if !t.contains_key("image") {
                            self.diags.push(
                                Diagnostic::error(v.span(), "container needs an `image`")
                                    .with_help("e.g. container = { image = \"localhost/eval:1\", command = [\"/eval\"] }"),
                            );
                        }
                        None
                    }
                };
                let command = t
                    .get("command")
                    .map(|c| self.string_array(c, "container.command"));
                let entrypoint = t.get("entrypoint").and_then(|e| match e.get_ref() {
                    DeValue::String(_) => self.string(e, "container.entrypoint").map(|s| vec![s]),
                    _ => Some(self.string_array(e, "container.entrypoint")),
                });
                let env = t
                    .get("env")
                    .map(|e| self.string_table(e, "container.env"))
                    .unwrap_or_default();
                let workdir = t
                    .get("workdir")
                    .and_then(|w| self.string(w, "container.workdir"));
                if let Some(w) = &workdir
                    && !w.get_ref().starts_with('/')
                {
                    self.error(w.span(), "container.workdir must be an absolute path");
                }
                let user = t.get("user").and_then(|u| self.string(u, "container.user"));
                let network = t
                    .get("network")
                    .and_then(|n| self.boolean(n, "container.network"))
                    .unwrap_or(false);
                let read_only_root = t
                    .get("read_only_root")
                    .and_then(|n| self.boolean(n, "container.read_only_root"))
                    .unwrap_or(true);
                Some(StepKind::Container(Box::new(ContainerStep {
                    image: image?,
                    command,
                    entrypoint,
                    env,
                    workdir,
                    user,
                    network,
                    read_only_root,
                })))
            }
            "module" => {
                let spec = self.string(v, "module")?;
                match env.modules.resolve(spec.get_ref()) {
                    Err(e) => {
                        let mut d =
                            Diagnostic::error(spec.span(), format!("step `{step}`: {}", e.message));
                        if let Some(h) = e.help {
                            d = d.with_help(h);
                        }
                        self.diags.push(d);
                        None
                    }
                    Ok(r) => {
                        if let Some(w) = &r.warning {
                            self.diags.push(
                                Diagnostic::warning(spec.span(), format!("step `{step}`: {w}"))
                                    .with_help(format!(
                                        "it still runs; pin another version of `{}` to silence this",
                                        r.module.name
                                    )),
                            );
                        }
                        Some(StepKind::Module {
                            spec,
                            module: ModuleRef {
                                id: r.module.id(),
                                digest: r.module.digest.clone(),
                                kind: r.module.kind.clone(),
                                entry: r.module.entry.clone(),
                                warning: r.warning,
                            },
                            resolved: r.path,
                        })
                    }
                }
            }
            "transfer" => {
                let t = self.table(v, "transfer")?;
                self.unknown_keys(t, &["from", "to", "datastore"], "transfer");
                let from = match t.get("from") {
                    Some(f) => self
                        .string(f, "transfer.from")
                        .and_then(|r| self.reference(&r)),
                    None => {
                        self.error(
                            v.span(),
                            "transfer needs `from` (\"step.output\" or \"inputs.NAME\")",
                        );
                        None
                    }
                };
                let to = match t.get("to") {
                    Some(to) => self.string(to, "transfer.to"),
                    None => {
                        self.error(v.span(), "transfer needs `to` (a path in the datastore)");
                        None
                    }
                };
                if let Some(to) = &to {
                    let p = Path::new(to.get_ref());
                    if to.get_ref().is_empty()
                        || p.is_absolute()
                        || p.components()
                            .any(|c| !matches!(c, std::path::Component::Normal(_)))
                    {
                        self.error(
                            to.span(),
                            format!("transfer.to `{}` must be a relative path inside the datastore, without `..`", to.get_ref()),
                        );
                    }
                }
                let datastore = t
                    .get("datastore")
                    .and_then(|d| self.string(d, "transfer.datastore"))
                    .unwrap_or_else(|| Spanned::new(v.span(), "default".into()));
                self.datastore(&datastore, env);
                Some(StepKind::Transfer {
                    from: from?,
                    to: to?,
                    datastore,
                })
            }
            _ => unreachable!("STEP_KINDS"),
        }
    }

    fn retries(&mut self, v: &Value<'_>) -> Retries {
        let mut r = Retries {
            attempts: 1,
            backoff: Duration::from_secs(1),
        };
        let Some(t) = self.table(v, "retries") else {
            return r;
        };
        self.unknown_keys(t, &["attempts", "backoff"], "retries");
        if let Some(a) = t
            .get("attempts")
            .and_then(|a| self.integer(a, "retries.attempts"))
        {
            if !(1..=100).contains(&a) {
                self.error(
                    t["attempts"].span(),
                    format!("retries.attempts must be between 1 and 100, got {a}"),
                );
            } else {
                r.attempts = a as u32;
            }
        }
        if let Some(b) = t
            .get("backoff")
            .and_then(|b| self.timer_duration(b, "retries.backoff"))
        {
            r.backoff = b;
        }
        r
    }

    /// Checks every `${…}` in a string: only `${params.NAME}` of declared params.
    fn interpolation(&mut self, s: &Sp<String>, text: &str, params: &[Param]) {
        for piece in interpolation_pieces(s.get_ref()) {
            match piece {
                Piece::Literal(_) => {}
                Piece::Param { name, at } => {
                    if !params.iter().any(|p| p.name.get_ref() == name) {
                        let known: Vec<&str> =
                            params.iter().map(|p| p.name.get_ref().as_str()).collect();
                        let mut d = Diagnostic::error(
                            value_span(text, s, at..at + name.len() + 10),
                            format!("unknown param `{name}` in `${{params.{name}}}`"),
                        );
                        d = match closest(name, known.iter().copied()) {
                            Some(c) => d.with_help(format!(
                                "did you mean `{c}`? {}",
                                declared_list("params", &known)
                            )),
                            None => d.with_help(declared_list("params", &known)),
                        };
                        self.diags.push(d);
                    }
                }
                Piece::Bad { text: bad, at } => {
                    self.diags.push(
                        Diagnostic::error(
                            value_span(text, s, at..at + bad.len()),
                            format!("bad interpolation `{bad}`"),
                        )
                        .with_help("write `${params.NAME}`; a literal `$` followed by `{` is written `$${`"),
                    );
                }
            }
        }
    }

    fn reference(&mut self, s: &Sp<String>) -> Option<Sp<Reference>> {
        match parse_reference(s.get_ref()) {
            Some(r) => Some(Spanned::new(s.span(), r)),
            None => {
                self.diags.push(
                    Diagnostic::error(s.span(), format!("`{}` is not a data reference", s.get_ref()))
                        .with_help("write \"STEP.OUTPUT\" for a step's output or \"inputs.NAME\" for a pipeline input"),
                );
                None
            }
        }
    }

    pub(crate) fn unknown_keys(&mut self, t: &DeTable<'_>, known: &[&str], context: &str) {
        for k in t.keys() {
            if !known.contains(&k.get_ref().as_ref()) {
                let mut d = Diagnostic::error(
                    k.span(),
                    format!("unknown key `{}` in {context}", k.get_ref()),
                );
                d = match closest(k.get_ref(), known.iter().copied()) {
                    Some(c) => d.with_help(format!("did you mean `{c}`?")),
                    None => d.with_help(format!("expected one of: {}", known.join(", "))),
                };
                self.diags.push(d);
            }
        }
    }

    pub(crate) fn wrong_type(&mut self, v: &Value<'_>, what: &str, expected: &str) {
        self.error(
            v.span(),
            format!("{what} must be {expected}, not {}", v.get_ref().type_str()),
        );
    }

    pub(crate) fn table<'a, 'i>(
        &mut self,
        v: &'a Value<'i>,
        what: &str,
    ) -> Option<&'a DeTable<'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => {
                self.wrong_type(v, what, "a table");
                None
            }
        }
    }

    fn array_of_tables<'a, 'i>(&mut self, v: &'a Value<'i>, what: &str) -> Vec<&'a Value<'i>> {
        match v.get_ref() {
            DeValue::Array(a) => a.iter().collect(),
            _ => {
                self.error(
                    v.span(),
                    format!("`{what}` must be written as [[{what}]] tables"),
                );
                Vec::new()
            }
        }
    }

    pub(crate) fn string(&mut self, v: &Value<'_>, what: &str) -> Option<Sp<String>> {
        match v.get_ref() {
            // No argument, variable or path can hold a NUL: it would be cut where
            // the step sees it while the cache key kept it.
            DeValue::String(s) if s.contains('\0') => {
                self.error(
                    v.span(),
                    format!("{what}: the text holds a NUL character (\\u0000), which no argument, variable or path can carry"),
                );
                None
            }
            DeValue::String(s) => Some(Spanned::new(v.span(), s.to_string())),
            _ => {
                self.wrong_type(v, what, "a string");
                None
            }
        }
    }

    pub(crate) fn integer(&mut self, v: &Value<'_>, what: &str) -> Option<i64> {
        match v.get_ref() {
            DeValue::Integer(i) => {
                match i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()) {
                    Ok(n) => Some(n),
                    Err(_) => {
                        self.error(v.span(), format!("{what}: integer out of range"));
                        None
                    }
                }
            }
            _ => {
                self.wrong_type(v, what, "an integer");
                None
            }
        }
    }

    pub(crate) fn boolean(&mut self, v: &Value<'_>, what: &str) -> Option<bool> {
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(v, what, "true or false");
                None
            }
        }
    }

    pub(crate) fn string_array(&mut self, v: &Value<'_>, what: &str) -> Vec<Sp<String>> {
        match v.get_ref() {
            DeValue::Array(a) => a
                .iter()
                .filter_map(|e| self.string(e, &format!("each of {what}")))
                .collect(),
            _ => {
                self.wrong_type(v, what, "an array of strings");
                Vec::new()
            }
        }
    }

    fn string_table(&mut self, v: &Value<'_>, what: &str) -> Vec<(Sp<String>, Sp<String>)> {
        let Some(t) = self.table(v, what) else {
            return Vec::new();
        };
        t.iter()
            .filter_map(|(k, v)| {
                let value = self.string(v, &format!("{what}.{}", k.get_ref()))?;
                Some((Spanned::new(k.span(), k.get_ref().to_string()), value))
            })
            .collect()
    }

    pub(crate) fn duration(&mut self, v: &Value<'_>, what: &str) -> Option<Duration> {
        let s = self.string(v, what)?;
        match parse_duration(s.get_ref()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.diags.push(
                    Diagnostic::error(
                        s.span(),
                        format!("{what}: bad duration `{}`: {e}", s.get_ref()),
                    )
                    .with_help(
                        "durations look like \"90s\", \"30m\", \"2h\", \"1h 30m\", \"500ms\"",
                    ),
                );
                None
            }
        }
    }

    /// A duration a timer adds to the clock (a debounce, a backoff, a grace
    /// period): at most a year, since a longer one overflows `Instant` arithmetic.
    pub(crate) fn timer_duration(&mut self, v: &Value<'_>, what: &str) -> Option<Duration> {
        let d = self.duration(v, what)?;
        if d > MAX_TIMER {
            self.error(v.span(), format!("{what} must be at most a year"));
            return None;
        }
        Some(d)
    }

    pub(crate) fn size(&mut self, v: &Value<'_>, what: &str) -> Option<u64> {
        let s = self.string(v, what)?;
        match parse_size(s.get_ref()) {
            Ok(n) => Some(n),
            Err(e) => {
                self.diags.push(
                    Diagnostic::error(s.span(), format!("{what}: bad size `{}`: {e}", s.get_ref()))
                        .with_help("sizes look like \"512MiB\", \"2GiB\", \"100MB\""),
                );
                None
            }
        }
    }

    fn name(&mut self, n: &Sp<String>, what: &str, rule: NameRule) {
        if !valid_name(n.get_ref(), rule) {
            let rule_text = match rule {
                NameRule::Pipeline => {
                    "lowercase letters, digits and `-`, starting with a letter or digit"
                }
                NameRule::Identifier => {
                    "lowercase letters, digits, `_` and `-`, starting with a letter"
                }
            };
            self.error(
                n.span(),
                format!(
                    "bad {what} `{}`: use {rule_text}, at most 63 characters",
                    n.get_ref()
                ),
            );
        }
    }
}

#[derive(Clone, Copy)]
enum NameRule {
    /// `[a-z0-9][a-z0-9-]*`: pipelines and experiments.
    Pipeline,
    /// `[a-z][a-z0-9_-]*`: steps, outputs, inputs, params, mounts.
    Identifier,
}

fn valid_name(s: &str, rule: NameRule) -> bool {
    let mut chars = s.chars();
    let first_ok = match (chars.next(), rule) {
        (Some(c), NameRule::Pipeline) => c.is_ascii_lowercase() || c.is_ascii_digit(),
        (Some(c), NameRule::Identifier) => c.is_ascii_lowercase(),
        (None, _) => false,
    };
    first_ok
        && s.len() <= 63
        && chars.all(|c| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || c == '-'
                || (c == '_' && matches!(rule, NameRule::Identifier))
        })
}

fn valid_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Where bytes `part` of a string value are in the file: exactly there when the
/// value is written as it reads (one-line quotes, no escapes), else the whole
/// string: an escape (`\u00e9`, `\"`) or a multi-line string shifts every offset
/// after it.
fn value_span(text: &str, s: &Sp<String>, part: Span) -> Span {
    let span = s.span();
    let raw = text.get(span.clone()).unwrap_or_default();
    let quoted = raw.len() >= 2
        && (raw.starts_with('"') && raw.ends_with('"')
            || raw.starts_with('\'') && raw.ends_with('\''));
    if quoted && raw.get(1..raw.len() - 1) == Some(s.get_ref().as_str()) {
        span.start + 1 + part.start..span.start + 1 + part.end
    } else {
        span
    }
}

fn declared_list(what: &str, names: &[&str]) -> String {
    if names.is_empty() {
        format!("no {what} are declared")
    } else {
        format!("declared {what}: {}", names.join(", "))
    }
}

/// `inputs.NAME` or `STEP.OUTPUT`.
pub fn parse_reference(s: &str) -> Option<Reference> {
    let (a, b) = s.split_once('.')?;
    if a.is_empty() || b.is_empty() || b.contains('.') {
        return None;
    }
    Some(if a == "inputs" {
        Reference::Input(b.into())
    } else {
        Reference::Output {
            step: a.into(),
            output: b.into(),
        }
    })
}

/// One piece of a string with `${params.NAME}` interpolations.
#[derive(Debug, PartialEq)]
pub enum Piece<'a> {
    Literal(&'a str),
    /// `at` is the byte offset of the `$`.
    Param {
        name: &'a str,
        at: usize,
    },
    Bad {
        text: &'a str,
        at: usize,
    },
}

/// Splits a string into literals and `${params.NAME}` references; `$${` is a literal `${`.
/// Offsets are bytes of `s`, always at character boundaries: the scan moves from
/// one `$` to the next (an ASCII byte), never into a multi-byte character.
pub fn interpolation_pieces(s: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = 0;
    let mut from = 0;
    while let Some(found) = s[from..].find('$') {
        let i = from + found;
        let tail = &s[i..];
        if tail.starts_with("$${") {
            if rest < i {
                out.push(Piece::Literal(&s[rest..i]));
            }
            out.push(Piece::Literal("${"));
            rest = i + 3;
            from = rest;
        } else if tail.starts_with("${") {
            if rest < i {
                out.push(Piece::Literal(&s[rest..i]));
            }
            match tail.find('}') {
                Some(end) => {
                    let inner = &tail[2..end];
                    match inner.strip_prefix("params.") {
                        Some(name) if !name.is_empty() => out.push(Piece::Param { name, at: i }),
                        _ => out.push(Piece::Bad {
                            text: &tail[..=end],
                            at: i,
                        }),
                    }
                    rest = i + end + 1;
                }
                None => {
                    out.push(Piece::Bad { text: tail, at: i });
                    rest = s.len();
                }
            }
            from = rest;
        } else {
            from = i + 1;
        }
    }
    if rest < s.len() {
        out.push(Piece::Literal(&s[rest..]));
    }
    out
}

/// Expands `${params.NAME}`; names were checked by validation.
pub fn interpolate(s: &str, params: &dyn Fn(&str) -> Option<String>) -> String {
    interpolation_pieces(s)
        .into_iter()
        .map(|p| match p {
            Piece::Literal(l) => l.to_string(),
            Piece::Param { name, .. } => params(name).unwrap_or_default(),
            Piece::Bad { text, .. } => text.to_string(),
        })
        .collect()
}

/// `"90s"`, `"30m"`, `"2h"`, `"1h 30m"`, `"500ms"`, `"1d"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| e.to_string())
}

/// `"512MiB"`, `"2GiB"`, `"100MB"`, `"4096"` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| "expected a number followed by a unit".to_string())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "MB" => 1000_u64.pow(2),
        "GB" => 1000_u64.pow(3),
        "TB" => 1000_u64.pow(4),
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit `{other}` (use B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    let bytes = num * mult as f64;
    if bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err("size out of range".into());
    }
    Ok(bytes as u64)
}

pub fn format_size(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if n >= size && n.is_multiple_of(size) {
            return format!("{}{unit}", n / size);
        }
    }
    format!("{n}B")
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

    /// The params of a run: the declared defaults overridden by `overrides`.
    pub fn resolve_params(
        &self,
        overrides: &[(String, String)],
    ) -> Result<Vec<(String, ParamValue)>, String> {
        let mut values: Vec<(String, ParamValue)> = self
            .params
            .iter()
            .map(|p| (p.name.get_ref().clone(), p.value.clone()))
            .collect();
        for (k, v) in overrides {
            let Some(slot) = values.iter_mut().find(|(n, _)| n == k) else {
                let known: Vec<&str> = self
                    .params
                    .iter()
                    .map(|p| p.name.get_ref().as_str())
                    .collect();
                return Err(format!(
                    "unknown param `{k}`: {}",
                    declared_list("params", &known)
                ));
            };
            check_param_value(k, v)?;
            slot.1 = slot
                .1
                .parse_like(v)
                .map_err(|e| format!("param `{k}`: {e}"))?;
        }
        Ok(values)
    }
}

/// A param value given by a caller (`--param`, the API) must be text a step can
/// receive: a NUL cannot pass through a process argument or an environment
/// variable (it would be cut there while the cache key kept it), and other
/// control characters (escape sequences, carriage returns) rewrite the terminal
/// of whoever lists the run. Tab and newline are text.
pub fn check_param_value(name: &str, value: &str) -> Result<(), String> {
    match value
        .char_indices()
        .find(|(_, c)| c.is_control() && !matches!(c, '\t' | '\n'))
    {
        Some((at, c)) => Err(format!(
            "param `{}`: its value has the control character U+{:04X} at byte {at}; \
             param values are text (tab and newline are allowed, other control characters are not)",
            name.escape_debug(),
            c as u32
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_values_with_control_characters_are_refused() {
        assert!(check_param_value("p", "a\tb\nc é").is_ok());
        let e = check_param_value("p", "ab\0c").unwrap_err();
        assert!(e.contains("U+0000 at byte 2"), "{e}");
        assert!(check_param_value("p", "\u{1b}[2J").is_err());
        assert!(check_param_value("p", "x\r").is_err());
        assert!(check_param_value("p", "\u{9b}").is_err());
    }

    #[test]
    fn interpolation_splits_params_and_escapes() {
        assert_eq!(
            interpolation_pieces("a${params.x}b$${c}"),
            vec![
                Piece::Literal("a"),
                Piece::Param { name: "x", at: 1 },
                Piece::Literal("b"),
                Piece::Literal("${"),
                Piece::Literal("c}")
            ]
        );
        let get = |n: &str| (n == "x").then(|| "7".to_string());
        assert_eq!(interpolate("--n=${params.x}", &get), "--n=7");
        assert!(matches!(
            interpolation_pieces("${env.x}")[0],
            Piece::Bad { .. }
        ));
    }

    #[test]
    fn interpolation_of_non_ascii_text() {
        assert_eq!(interpolation_pieces("café"), vec![Piece::Literal("café")]);
        assert_eq!(
            interpolation_pieces("日本${params.é}ü$${é}$"),
            vec![
                Piece::Literal("日本"),
                Piece::Param { name: "é", at: 6 },
                Piece::Literal("ü"),
                Piece::Literal("${"),
                Piece::Literal("é}$"),
            ]
        );
        assert!(matches!(
            interpolation_pieces("é${é")[1],
            Piece::Bad {
                text: "${é", at: 2
            }
        ));
        let get = |n: &str| (n == "é").then(|| "ça".to_string());
        assert_eq!(interpolate("→${params.é}←", &get), "→ça←");
    }

    fn check(text: &str) -> String {
        let (_, r) = crate::graph::parse(
            Path::new("/nowhere/p.toml"),
            text.into(),
            &Environment::default(),
        );
        r.to_string()
    }

    #[test]
    fn an_interpolation_error_points_into_the_string_as_written() {
        let step = "[[step]]\nname = \"a\"\ntransfer = { from = \"inputs.x\", to = \"y\" }\n[inputs.x]\npath = \"x\"\n[[step]]\nname = \"b\"\nwasm = \"b.wasm\"\n";
        // As written: the caret is under `${params.y}`.
        let out = check(&format!("{step}args = [\"é ${{params.y}}\"]\n"));
        assert!(
            out.contains("p.toml:9:12: error: unknown param `y`"),
            "{out}"
        );
        // An escape before it shifts the offsets: the whole string is marked.
        let out = check(&format!("{step}args = [\"\\u00e9 ${{params.y}}\"]\n"));
        assert!(
            out.contains("p.toml:9:9: error: unknown param `y`"),
            "{out}"
        );
        let out = check(&format!("{step}args = [\"\"\"\né ${{params.y}}\"\"\"]\n"));
        assert!(
            out.contains("p.toml:9:9: error: unknown param `y`"),
            "{out}"
        );
    }

    #[test]
    fn out_of_range_numbers_and_timers_are_errors() {
        let step = "[[step]]\nname = \"a\"\nwasm = \"a.wasm\"\n";
        let out = check(&format!(
            "{step}retries = {{ attempts = 99999999999999999999 }}\n"
        ));
        assert!(
            out.contains("p.toml:4:24: error: retries.attempts: integer out of range"),
            "{out}"
        );
        let out = check(&format!("{step}retries = {{ backoff = \"1000000y\" }}\n"));
        assert!(
            out.contains("p.toml:4:23: error: retries.backoff must be at most a year"),
            "{out}"
        );
        let out = check(&format!(
            "[[trigger]]\nwatch = \"*.csv\"\ndebounce = \"400y\"\n{step}"
        ));
        assert!(
            out.contains("p.toml:3:12: error: debounce must be at most a year"),
            "{out}"
        );
    }

    #[test]
    fn sizes_and_durations_of_non_ascii_text_are_errors() {
        for s in [
            "12 é",
            "１２MiB",
            "1.5Mé",
            "é",
            "1e30GiB",
            "99999999999999999999999TiB",
        ] {
            assert!(parse_size(s).is_err(), "{s}");
        }
        for s in [
            "1é",
            "é1s",
            "1 ｓ",
            "99999999999999999999999999s",
            "584942417355y",
        ] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
        assert_eq!(parse_duration("5 µs"), Ok(Duration::from_micros(5)));
    }

    /// The `toml` parser bounds nesting itself (80 levels); this holds it to that
    /// on a small stack, so an upgrade that drops the bound fails here first.
    #[test]
    fn deep_nesting_is_a_located_error_not_a_stack_overflow() {
        let cases = [
            format!("a = {}1", "[".repeat(100_000)),
            format!("a = {}1{}", "{x=".repeat(100_000), "}".repeat(100_000)),
            format!("[{}a]", "a.".repeat(100_000)),
            format!("{}a = 1", "a.".repeat(100_000)),
        ];
        for text in cases {
            let out = std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || check(&text))
                .unwrap()
                .join()
                .unwrap();
            assert!(
                out.contains("p.toml:1:"),
                "{}",
                out.chars().take(2000).collect::<String>()
            );
            assert!(
                out.contains("error: invalid TOML"),
                "{}",
                out.chars().take(2000).collect::<String>()
            );
        }
    }

    #[test]
    fn a_watch_glob_is_bounded_before_it_is_compiled() {
        let step = "[[step]]\nname = \"a\"\nwasm = \"a.wasm\"\n";
        let glob = |g: &str| check(&format!("[[trigger]]\nwatch = \"{g}\"\n{step}"));
        let out = glob(&format!("inbox/*{}.csv", "$".repeat(1 << 20)));
        assert!(
            out.contains("p.toml:2:9: error: the watch glob has 1048587 characters, more than the limit of 1024"),
            "{}",
            out.chars().take(1000).collect::<String>()
        );
        // The worst globs within the limit compile (or are refused) without a panic.
        for g in [
            "$".repeat(1024),
            "*".repeat(1024),
            "?".repeat(1024),
            "**/".repeat(341),
            "[a-z]".repeat(204),
            "{a,".repeat(341),
            format!("{}{}", "{a,".repeat(170), "}".repeat(170)),
            "[!a-z0-9]".repeat(113),
            "[\u{80}-\u{10FFFF}]".repeat(204),
            "[!\u{80}-\u{10FFFF}]*".repeat(146),
        ] {
            assert!(g.chars().count() <= MAX_GLOB_CHARS);
            let _ = glob(&g);
        }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(format_size(2 << 30), "2GiB");
    }

    #[test]
    fn float_params_keep_their_decimal_point() {
        assert_eq!(ParamValue::Float(1.0).to_string(), "1.0");
        assert_eq!(
            ParamValue::Float(0.5).parse_like("0.7"),
            Ok(ParamValue::Float(0.7))
        );
        assert!(ParamValue::Integer(1).parse_like("x").is_err());
    }
}
