//! The daemon config (SPEC "Daemon config"), checked like a pipeline file: every
//! mistake at once, each at its `file:line:col`. Relative paths resolve against
//! the config file's directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::DeTable;

use crate::definition::{Environment, Walker};
use crate::diagnostic::{Diagnostic, Report, SourceFile};

#[derive(Debug, Clone)]
pub struct Config {
    /// The config file (absolute).
    pub path: PathBuf,
    /// Directory of pipeline files, watched and hot-reloaded.
    pub pipelines: PathBuf,
    /// SQLite database and artifact store.
    pub state_dir: PathBuf,
    /// Step slots shared by every run; default: the number of CPUs.
    pub max_parallel_steps: usize,
    /// On SIGTERM, how long running steps may take to finish before they are
    /// stopped.
    pub shutdown_grace: Duration,
    /// Resume the runs a crash or a shutdown interrupted.
    pub resume_interrupted: bool,
    pub api: Api,
    pub datastores: BTreeMap<String, PathBuf>,
    pub computes: BTreeMap<String, Compute>,
    pub python: Python,
    /// `[secrets.NAME]`: where each secret's value is read from at run time.
    pub secrets: BTreeMap<String, Secret>,
}

/// Where a `[secrets.NAME]` value comes from. Only the source is kept: the value
/// is read when a step that names the secret starts (SPEC "Secrets").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    /// `file = "/etc/millrace/secrets/db"`: readable by its owner only.
    File(PathBuf),
    /// `env = "DB_PASSWORD"`: a variable of the daemon's own environment.
    Env(String),
}

/// `[python]`: the warm interpreter Python steps start from (SPEC "Python steps").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Python {
    /// Modules imported once into the pre-initialised interpreter.
    pub preload: Vec<String>,
    /// Python steps start from the snapshot when it is built (default true).
    pub snapshot: bool,
}

impl Default for Python {
    fn default() -> Python {
        Python {
            preload: crate::executor::snapshot::DEFAULT_PRELOAD
                .iter()
                .map(|m| m.to_string())
                .collect(),
            snapshot: true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Api {
    pub listen: SocketAddr,
    /// Bearer token for mutating calls; default `<state_dir>/api-token`, created
    /// on first start.
    pub token_file: Option<PathBuf>,
    /// Reads without a token (default true).
    pub public_read: bool,
    /// Host names (or addresses) the API answers to besides the loopback ones and
    /// the listen address, lowercase: the names a reverse proxy or the users' URLs
    /// use. Any other `Host` is refused (DNS rebinding).
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Compute {
    /// `local`, `container` or `slurm`.
    pub kind: String,
    /// A container engine's Docker API socket (`unix:///…` or `tcp://…`);
    /// default `$DOCKER_HOST`, else the usual podman and docker sockets.
    pub socket: Option<String>,
    /// A container engine may pull missing images (default: no).
    pub pull: bool,
    /// A Slurm cluster's settings (kind = "slurm").
    pub slurm: Option<crate::executor::slurm::Target>,
}

const KEYS: &[&str] = &[
    "pipelines",
    "state_dir",
    "max_parallel_steps",
    "shutdown_grace",
    "resume_interrupted",
    "api",
    "datastores",
    "compute",
    "python",
    "secrets",
];
const API_KEYS: &[&str] = &["listen", "token_file", "public_read", "allowed_hosts"];
/// Keys of a `[compute.NAME]` table beyond the Slurm ones; each is checked
/// against the target's kind.
const COMPUTE_KEYS: &[&str] = &["kind", "socket", "pull"];

const SLURM_KEYS: &[&str] = &[
    "partition",
    "account",
    "qos",
    "time_limit",
    "gpus",
    "gres",
    "cpus_per_task",
    "mem",
    "extra_args",
    "shared_dir",
];

/// The settings of a `kind = "slurm"` target.
fn slurm_target(
    w: &mut Walker,
    c: &DeTable<'_>,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Option<crate::executor::slurm::Target> {
    let mut text = |key: &str| {
        c.get(key)
            .and_then(|x| w.string(x, key))
            .map(|s| s.into_inner())
    };
    let partition = text("partition");
    let account = text("account");
    let qos = text("qos");
    let time_limit = text("time_limit");
    let gpus = text("gpus");
    let gres = text("gres");
    let mem = text("mem");
    let cpus_per_task = match c.get("cpus_per_task") {
        Some(x) => match w.integer(x, "cpus_per_task") {
            Some(n) if (1..=4096).contains(&n) => Some(n as u32),
            Some(_) => {
                w.error(x.span(), "cpus_per_task must be between 1 and 4096");
                None
            }
            None => None,
        },
        None => None,
    };
    let extra_args = c
        .get("extra_args")
        .map(|x| {
            w.string_array(x, "extra_args")
                .into_iter()
                .map(|s| s.into_inner())
                .collect()
        })
        .unwrap_or_default();
    // Default: `<state_dir>/slurm`, filled in once the state dir is known; right
    // for one machine, and for a cluster whose nodes mount the state dir.
    let shared_dir = c
        .get("shared_dir")
        .and_then(|x| w.string(x, "shared_dir"))
        .map(|d| resolve(d.get_ref()))
        .unwrap_or_default();
    Some(crate::executor::slurm::Target {
        partition,
        account,
        qos,
        time_limit,
        gpus,
        gres,
        cpus_per_task,
        mem,
        extra_args,
        shared_dir,
    })
}

/// A host as the API compares it (lowercase, no trailing dot, an IPv6 address
/// without brackets), or None if `text` is neither a DNS name nor an IP address.
pub fn host_name(text: &str) -> Option<String> {
    let t = text.trim_end_matches('.').to_ascii_lowercase();
    let bare = t
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(&t);
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return Some(ip.to_string());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (t.len() <= 253 && t.split('.').all(label_ok)).then_some(t)
}

pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8640))
}

impl Config {
    /// The pipelines' view of this config: its datastores and compute targets.
    pub fn environment(&self) -> Environment {
        let mut env = Environment::default();
        for k in self.datastores.keys() {
            if !env.datastores.contains(k) {
                env.datastores.push(k.clone());
            }
        }
        env.datastore_paths = Datastores {
            paths: self
                .datastores
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        for (k, c) in &self.computes {
            env.computes.insert(k.clone(), c.kind.clone());
        }
        env.secrets = Some(self.secrets.keys().cloned().collect());
        env
    }

    pub fn token_path(&self) -> PathBuf {
        self.api
            .token_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("api-token"))
    }
}

/// Reads and checks a daemon config file.
/// A file that is not UTF-8 is reported at its first invalid byte.
pub fn load(path: &Path) -> Result<(Option<Config>, Report), std::io::Error> {
    let bytes = std::fs::read(path)?;
    let path = std::path::absolute(path)?;
    Ok(parse_bytes(&path, bytes))
}

/// Checks a daemon config's bytes: [`parse`] once they are UTF-8 text.
pub fn parse_bytes(path: &Path, bytes: Vec<u8>) -> (Option<Config>, Report) {
    match SourceFile::decode(path, bytes) {
        Ok(source) => parse(path, source.text),
        Err(report) => (None, report),
    }
}

pub fn parse(path: &Path, text: String) -> (Option<Config>, Report) {
    let source = SourceFile::new(path, text);
    crate::diagnostic::reset_hint_budget();
    let mut w = Walker { diags: Vec::new() };
    let (doc, errors) = DeTable::parse_recoverable(&source.text);
    for e in &errors {
        w.diags.push(Diagnostic::error(
            e.span().unwrap_or(0..0),
            format!("invalid TOML: {}", e.message().trim()),
        ));
    }
    let config = if errors.is_empty() {
        config(&mut w, doc.get_ref(), path)
    } else {
        None
    };
    let diagnostics = w.diags;
    let report = Report::new(source, diagnostics);
    let config = if report.has_errors() { None } else { config };
    (config, report)
}

fn config(w: &mut Walker, doc: &DeTable<'_>, path: &Path) -> Option<Config> {
    w.unknown_keys(doc, KEYS, "the daemon config");
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |p: &str| dir.join(p);
    let mut required = |key: &str, what: &str| match doc.get(key) {
        Some(v) => w.string(v, key).map(|s| resolve(s.get_ref())),
        None => {
            w.error(
                0..0,
                format!("the daemon config needs `{key} = \"DIR\"`: {what}"),
            );
            None
        }
    };
    let pipelines = required("pipelines", "the directory of pipeline files");
    let state_dir = required("state_dir", "where the database and artifacts live");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max_parallel_steps = match doc.get("max_parallel_steps") {
        Some(v) => match w.integer(v, "max_parallel_steps") {
            Some(n) if (1..=1024).contains(&n) => n as usize,
            Some(n) => {
                w.error(
                    v.span(),
                    format!("max_parallel_steps must be between 1 and 1024, not {n}"),
                );
                cpus
            }
            None => cpus,
        },
        None => cpus,
    };
    let shutdown_grace = doc
        .get("shutdown_grace")
        .and_then(|v| w.timer_duration(v, "shutdown_grace"))
        .unwrap_or(Duration::from_secs(30));
    let resume_interrupted = doc
        .get("resume_interrupted")
        .and_then(|v| w.boolean(v, "resume_interrupted"))
        .unwrap_or(true);
    let api = api(w, doc, &resolve);
    let datastores = datastores(w, doc, &resolve);
    let mut computes = computes(w, doc, &resolve);
    let python = python(w, doc);
    let secrets = secrets(w, doc, &resolve);
    let state_dir = state_dir?;
    for c in computes.values_mut() {
        if let Some(t) = &mut c.slurm
            && t.shared_dir.as_os_str().is_empty()
        {
            t.shared_dir = state_dir.join("slurm");
        }
    }
    Some(Config {
        path: path.to_path_buf(),
        pipelines: pipelines?,
        state_dir,
        max_parallel_steps,
        shutdown_grace,
        resume_interrupted,
        python,
        api,
        datastores,
        computes,
        secrets,
    })
}

/// `[secrets.NAME]`: `file = "PATH"` or `env = "VAR"`, exactly one. A file that
/// its group or others may read is refused here, where the mistake is located;
/// one that does not exist yet is the run's business (the step fails, naming it).
fn secrets(
    w: &mut Walker,
    doc: &DeTable<'_>,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> BTreeMap<String, Secret> {
    let mut secrets = BTreeMap::new();
    let Some(v) = doc.get("secrets") else {
        return secrets;
    };
    let Some(t) = w.table(v, "[secrets]") else {
        return secrets;
    };
    for (name, v) in t {
        let what = format!("[secrets.{}]", name.get_ref());
        if !crate::definition::is_identifier(name.get_ref()) {
            w.error(
                name.span(),
                format!(
                    "bad secret name `{}`: use lowercase letters, digits, `_` and `-`, starting with a letter, at most 63 characters",
                    name.get_ref()
                ),
            );
            continue;
        }
        let Some(d) = w.table(v, &what) else { continue };
        w.unknown_keys(d, &["file", "env"], &what);
        let source = match (d.get("file"), d.get("env")) {
            (Some(f), None) => w.string(f, "file").and_then(|f| {
                let path = resolve(f.get_ref());
                match file_mode(&path) {
                    Some(mode) if mode & 0o077 != 0 => {
                        w.error(
                            f.span(),
                            format!(
                                "{what}: {} is readable by its group or others (mode {:04o}): `chmod 600` it",
                                path.display(),
                                mode & 0o7777
                            ),
                        );
                        None
                    }
                    _ => Some(Secret::File(path)),
                }
            }),
            (None, Some(e)) => w.string(e, "env").and_then(|e| {
                if crate::definition::valid_env_name(e.get_ref()) {
                    Some(Secret::Env(e.into_inner()))
                } else {
                    w.error(
                        e.span(),
                        format!("`{}` is not a valid environment variable name", e.get_ref()),
                    );
                    None
                }
            }),
            (Some(_), Some(e)) => {
                w.error(
                    e.span(),
                    format!("{what} has both `file` and `env`: a secret has one source"),
                );
                None
            }
            (None, None) => {
                w.error(
                    v.span(),
                    format!("{what} needs `file = \"PATH\"` or `env = \"VARIABLE\"`"),
                );
                None
            }
        };
        if let Some(source) = source {
            secrets.insert(name.get_ref().to_string(), source);
        }
    }
    secrets
}

/// A file's permission bits, if it can be looked at.
pub fn file_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).ok().map(|m| m.permissions().mode())
}

/// `[api]`: where the API listens and who may read it.
fn api(w: &mut Walker, doc: &DeTable<'_>, resolve: &dyn Fn(&str) -> PathBuf) -> Api {
    let mut api = Api {
        listen: default_listen(),
        token_file: None,
        public_read: true,
        allowed_hosts: Vec::new(),
    };
    if let Some(v) = doc.get("api")
        && let Some(t) = w.table(v, "[api]")
    {
        w.unknown_keys(t, API_KEYS, "[api]");
        if let Some(l) = t.get("listen").and_then(|l| w.string(l, "api.listen")) {
            match l.get_ref().parse::<SocketAddr>() {
                Ok(a) => api.listen = a,
                Err(_) => w.error(
                    l.span(),
                    format!(
                        "api.listen: `{}` is not an address: expected IP:PORT like \"127.0.0.1:8640\"",
                        l.get_ref()
                    ),
                ),
            }
        }
        if let Some(f) = t
            .get("token_file")
            .and_then(|f| w.string(f, "api.token_file"))
        {
            api.token_file = Some(resolve(f.get_ref()));
        }
        if let Some(b) = t
            .get("public_read")
            .and_then(|b| w.boolean(b, "api.public_read"))
        {
            api.public_read = b;
        }
        if let Some(v) = t.get("allowed_hosts") {
            for h in w.string_array(v, "api.allowed_hosts") {
                match host_name(h.get_ref()) {
                    Some(name) => api.allowed_hosts.push(name),
                    None => w.error(
                        h.span(),
                        format!(
                            "api.allowed_hosts: `{}` is not a host: expected a name like \"millrace.example.org\" or an IP address, without scheme or port",
                            h.get_ref()
                        ),
                    ),
                }
            }
        }
    }
    api
}

/// `[datastores.NAME]`: where each datastore is.
fn datastores(
    w: &mut Walker,
    doc: &DeTable<'_>,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> BTreeMap<String, PathBuf> {
    let mut datastores = BTreeMap::new();
    if let Some(v) = doc.get("datastores")
        && let Some(t) = w.table(v, "[datastores]")
    {
        for (name, v) in t {
            let what = format!("[datastores.{}]", name.get_ref());
            let Some(d) = w.table(v, &what) else { continue };
            w.unknown_keys(d, &["path"], &what);
            match d.get("path").and_then(|p| w.string(p, "path")) {
                Some(p) => {
                    datastores.insert(name.get_ref().to_string(), resolve(p.get_ref()));
                }
                None if d.get("path").is_none() => {
                    w.error(v.span(), format!("{what} needs `path = \"DIR\"`"))
                }
                None => {}
            }
        }
    }
    datastores
}

/// `[compute.NAME]`: the compute targets besides the implicit `local`.
fn computes(
    w: &mut Walker,
    doc: &DeTable<'_>,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> BTreeMap<String, Compute> {
    let mut computes = BTreeMap::new();
    if let Some(v) = doc.get("compute")
        && let Some(t) = w.table(v, "[compute]")
    {
        for (name, v) in t {
            let what = format!("[compute.{}]", name.get_ref());
            let Some(c) = w.table(v, &what) else { continue };
            let keys: Vec<&str> = COMPUTE_KEYS.iter().chain(SLURM_KEYS).copied().collect();
            w.unknown_keys(c, &keys, &what);
            let kind = match c.get("kind").and_then(|k| w.string(k, "kind")) {
                Some(k) if ["local", "container", "slurm"].contains(&k.get_ref().as_str()) => {
                    k.into_inner()
                }
                Some(k) => {
                    w.error(
                        k.span(),
                        format!(
                            "unknown compute kind `{}`: expected local, container or slurm",
                            k.get_ref()
                        ),
                    );
                    continue;
                }
                None => "local".to_string(),
            };
            let socket = c.get("socket").and_then(|s| w.string(s, "socket"));
            let pull = c.get("pull").and_then(|p| w.boolean(p, "pull"));
            let slurm = (kind == "slurm").then(|| slurm_target(w, c, resolve));
            if kind != "slurm" {
                for key in SLURM_KEYS {
                    if let Some(v) = c.get(*key) {
                        w.error(
                            v.span(),
                            format!("`{key}` applies to kind = \"slurm\" targets only"),
                        );
                    }
                }
            }
            if kind != "container" {
                for key in ["socket", "pull"] {
                    if let Some(v) = c.get(key) {
                        w.error(
                            v.span(),
                            format!("`{key}` applies to kind = \"container\" targets only"),
                        );
                    }
                }
            }
            if name.get_ref() == "local" && kind != "local" {
                w.error(
                    name.span(),
                    "`local` is the implicit local compute target: give this one another name",
                );
            }
            computes.insert(
                name.get_ref().to_string(),
                Compute {
                    kind,
                    socket: socket.map(|s| s.into_inner()),
                    pull: pull.unwrap_or(false),
                    slurm: slurm.flatten(),
                },
            );
        }
    }
    computes
}

/// `[python]`: the warm interpreter snapshot and what it preloads.
fn python(w: &mut Walker, doc: &DeTable<'_>) -> Python {
    let mut python = Python::default();
    if let Some(v) = doc.get("python")
        && let Some(t) = w.table(v, "[python]")
    {
        w.unknown_keys(t, &["preload", "snapshot"], "[python]");
        if let Some(b) = t
            .get("snapshot")
            .and_then(|b| w.boolean(b, "python.snapshot"))
        {
            python.snapshot = b;
        }
        if let Some(v) = t.get("preload") {
            python.preload.clear();
            for m in w.string_array(v, "python.preload") {
                // The list becomes Python source (`import a, b.c`): only dotted
                // identifiers, so a config cannot inject code into the build.
                if crate::executor::snapshot::is_module_name(m.get_ref()) {
                    python.preload.push(m.into_inner());
                } else {
                    w.error(
                        m.span(),
                        format!(
                            "python.preload: `{}` is not a module name: expected dotted identifiers like \"sklearn.linear_model\"",
                            m.get_ref()
                        ),
                    );
                }
            }
        }
    }
    python
}

/// Where datastores are: from the daemon config, or for `millrace run` the
/// pipeline's own directory as `default`. The engine and the planner (inputs,
/// transfer destinations) read it.
#[derive(Debug, Clone, Default)]
pub struct Datastores {
    pub paths: std::collections::HashMap<String, PathBuf>,
}

impl Datastores {
    /// Where datastore `name` is: its configured path, else the pipeline's own
    /// directory. The one base of every path a pipeline writes without a
    /// directory of its own: an input's `path`, a transfer's `to` and a watch
    /// glob, each in its `datastore` (`default` unless it names one).
    pub fn path(&self, name: &str, pipeline_dir: &Path) -> PathBuf {
        match self.paths.get(name) {
            Some(p) => p.clone(),
            None => pipeline_dir.to_path_buf(),
        }
    }

    /// The directories a pipeline in `pipeline_dir` may watch: every datastore's
    /// and its own.
    pub fn roots(&self, pipeline_dir: &Path) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = self.paths.values().cloned().collect();
        roots.push(pipeline_dir.to_path_buf());
        roots
    }

    pub fn environment(&self) -> Environment {
        let mut env = Environment::default();
        for k in self.paths.keys() {
            if !env.datastores.contains(k) {
                env.datastores.push(k.clone());
            }
        }
        env.datastore_paths = self.clone();
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_python_table_sets_the_preload_list_and_refuses_code() {
        let base = "pipelines = \"p\"\nstate_dir = \"s\"\n";
        let (c, r) = parse(Path::new("/m.toml"), base.into());
        assert!(!r.has_errors());
        assert_eq!(c.unwrap().python, Python::default());
        let (c, r) = parse(
            Path::new("/m.toml"),
            format!("{base}[python]\npreload = [\"numpy\", \"sklearn.tree\"]\nsnapshot = false\n"),
        );
        assert!(!r.has_errors(), "{}", r.to_string());
        let c = c.unwrap();
        assert_eq!(c.python.preload, ["numpy", "sklearn.tree"]);
        assert!(!c.python.snapshot);
        let (c, r) = parse(
            Path::new("/m.toml"),
            format!("{base}[python]\npreload = [\"os; os.system('x')\"]\nwarm = 1\n"),
        );
        assert!(c.is_none());
        let text = r.to_string();
        assert!(text.contains("is not a module name"), "{text}");
        assert!(text.contains("warm"), "{text}");
    }

    #[test]
    fn a_secret_has_one_source_and_a_name_a_file_can_carry() {
        let base = "pipelines = \"p\"\nstate_dir = \"s\"\n";
        let (c, r) = parse(
            Path::new("/x/m.toml"),
            format!(
                "{base}[secrets.db]\nfile = \"secrets/db\"\n[secrets.api]\nenv = \"API_KEY\"\n"
            ),
        );
        assert!(!r.has_errors(), "{}", r.to_string());
        let c = c.unwrap();
        assert_eq!(c.secrets["db"], Secret::File("/x/secrets/db".into()));
        assert_eq!(c.secrets["api"], Secret::Env("API_KEY".into()));
        assert_eq!(
            c.environment().secrets,
            Some(vec!["api".to_string(), "db".to_string()])
        );
        let (c, r) = parse(
            Path::new("/x/m.toml"),
            format!(
                "{base}[secrets.a]\nfile = \"f\"\nenv = \"E\"\n[secrets.b]\n[secrets.\"../x\"]\nenv = \"E\"\n[secrets.c]\nenv = \"1-no\"\n"
            ),
        );
        assert!(c.is_none());
        let text = r.to_string();
        assert!(
            text.contains("m.toml:5:7: error: [secrets.a] has both `file` and `env`"),
            "{text}"
        );
        assert!(
            text.contains("[secrets.b] needs `file = \"PATH\"` or `env = \"VARIABLE\"`"),
            "{text}"
        );
        assert!(text.contains("bad secret name `../x`"), "{text}");
        assert!(
            text.contains("`1-no` is not a valid environment variable name"),
            "{text}"
        );
    }

    #[test]
    fn example_shape_parses_and_paths_resolve_against_the_file() {
        let (c, r) = parse(
            Path::new("/etc/millrace/millrace.toml"),
            r#"
pipelines = "pipelines"
state_dir = "/var/lib/millrace"
max_parallel_steps = 2
[api]
listen = "127.0.0.1:0"
[datastores.default]
path = "data"
[compute.gpu]
kind = "slurm"
partition = "gpu"
"#
            .into(),
        );
        assert!(!r.has_errors(), "{}", r.to_string());
        let c = c.unwrap();
        assert_eq!(c.pipelines, Path::new("/etc/millrace/pipelines"));
        assert_eq!(c.datastores["default"], Path::new("/etc/millrace/data"));
        assert_eq!(c.api.listen.port(), 0);
        assert_eq!(c.token_path(), Path::new("/var/lib/millrace/api-token"));
    }

    #[test]
    fn mistakes_are_reported_together() {
        let (c, r) = parse(
            Path::new("/x/m.toml"),
            "pipelines = 1\nstate_dir = \"s\"\nmax_paralel_steps = 2\n[api]\nlisten = \"nope\"\n"
                .into(),
        );
        assert!(c.is_none());
        let text = r.to_string();
        assert!(text.contains("m.toml:1:13"), "{text}");
        assert!(text.contains("did you mean `max_parallel_steps`"), "{text}");
        assert!(text.contains("m.toml:5:10"), "{text}");
    }

    #[test]
    fn container_targets_take_a_socket_and_pull_and_steps_are_checked_against_their_kind() {
        let (c, r) = parse(
            Path::new("/x/m.toml"),
            "pipelines = \"p\"\nstate_dir = \"s\"\n[compute.engine]\nkind = \"container\"\nsocket = \"unix:///run/x.sock\"\npull = true\n[compute.box]\nkind = \"local\"\n"
                .into(),
        );
        assert!(!r.has_errors(), "{}", r.to_string());
        let c = c.unwrap();
        assert_eq!(
            c.computes["engine"].socket.as_deref(),
            Some("unix:///run/x.sock")
        );
        assert!(c.computes["engine"].pull);
        let env = c.environment();
        let (_, report) = crate::graph::parse(
            Path::new("/x/p/a.toml"),
            "[[step]]\nname = \"a\"\ntransfer = { from = \"inputs.x\", to = \"y\" }\n[[step]]\nname = \"w\"\nwasm = \"w.wasm\"\ncompute = \"engine\"\n[[step]]\nname = \"c\"\ncontainer = { image = \"i\" }\ncompute = \"engine\"\n[[step]]\nname = \"l\"\ncontainer = { image = \"i\" }\ncompute = \"box\"\n".into(),
            &env,
        );
        let text = report.to_string();
        assert!(
            text.contains("a.toml:7:11: error: compute `engine` is a container engine: only `container` steps run there"),
            "{text}"
        );
        assert_eq!(text.matches("compute `").count(), 1, "{text}");

        let (c, r) = parse(
            Path::new("/x/m.toml"),
            "pipelines = \"p\"\nstate_dir = \"s\"\n[compute.local]\nkind = \"slurm\"\nsocket = \"/x\"\n".into(),
        );
        assert!(c.is_none());
        let text = r.to_string();
        assert!(
            text.contains(
                "m.toml:5:10: error: `socket` applies to kind = \"container\" targets only"
            ),
            "{text}"
        );
        assert!(
            text.contains("`local` is the implicit local compute target"),
            "{text}"
        );
    }
}
