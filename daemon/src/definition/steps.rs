//! `[[step]]`: the keys every step has, and what each kind of step runs.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::values::Mounts;
use super::walker::{NameRule, declared_list, valid_env_name};
use super::{
    Environment, MAX_TIMER, ModuleRef, Param, Reference, Retries, Sp, Step, StepKind, TransferMode,
    Value, WASM32_MAX_MEMORY, Walker, format_size, parse_reference,
};
use crate::diagnostic::{Diagnostic, closest, display_path};

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
    "params",
    "inputs",
    "outputs",
    "after",
    "timeout",
    "memory",
    "cpus",
    "retries",
    "reuse",
    "secrets",
    "secret_env",
    "foreach",
];
const STEP_KINDS: &[&str] = &["wasm", "python", "container", "module", "transfer"];

impl Walker {
    pub(super) fn step(
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
        let named_params = match t.get("params") {
            Some(p) => self.step_params(p, params),
            None => Vec::new(),
        };
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
            Some(o) => self.step_outputs(o, &step_name),
            None => Vec::new(),
        };
        // After the mounts and outputs: `${inputs.MOUNT}` and `${outputs.NAME}`
        // are checked against them.
        let mount_names: Vec<&str> = inputs.iter().map(|(m, _)| m.get_ref().as_str()).collect();
        let output_names: Vec<&str> = outputs.iter().map(|o| o.get_ref().as_str()).collect();
        let mounts = Mounts::Step {
            inputs: &mount_names,
            outputs: &output_names,
        };
        for a in &args {
            self.interpolation(a, text, params, mounts);
        }
        let env_vars = match t.get("env") {
            Some(e) => self.step_env(e, text, params, mounts),
            None => Vec::new(),
        };
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
        let cpus = t.get("cpus").and_then(|c| self.cpus(c));
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
            self.compute(c, &kind, env);
        }
        if let Some(StepKind::Transfer { .. }) = &kind {
            self.transfer_keys(t);
        }
        let (secrets, secret_env) = self.step_secrets(t, &env_vars, &kind, env);
        let foreach = match (t.get("foreach"), &kind) {
            (Some(f), Some(StepKind::Transfer { .. })) => {
                self.error(
                    f.span(),
                    "`foreach` does not apply to a transfer step: it publishes one artifact whole",
                );
                None
            }
            (Some(f), _) => self.foreach(f, &inputs, &step_name),
            (None, _) => None,
        };
        Some(Step {
            name,
            span: v.span(),
            kind: kind?,
            args,
            env: env_vars,
            params: named_params,
            // Filled in by the pipeline walk, which knows the inputs' paths.
            uses: Vec::new(),
            inputs,
            outputs,
            after,
            timeout,
            memory,
            cpus,
            retries,
            reuse,
            compute,
            secrets,
            secret_env,
            foreach,
        })
    }

    /// `secrets = ["db"]` and `secret_env = { VAR = "db" }`: names of the daemon
    /// config's `[secrets.NAME]`, each once; every variable names one of the
    /// step's `secrets` and no variable of its `env`.
    #[allow(clippy::type_complexity)]
    fn step_secrets(
        &mut self,
        t: &DeTable<'_>,
        env_vars: &[(Sp<String>, Sp<String>)],
        kind: &Option<StepKind>,
        env: &Environment,
    ) -> (Vec<Sp<String>>, Vec<(Sp<String>, Sp<String>)>) {
        let names = match t.get("secrets") {
            Some(v) => self.string_array(v, "secrets"),
            None => Vec::new(),
        };
        let vars = match t.get("secret_env") {
            Some(v) => self.string_table(v, "secret_env"),
            None => Vec::new(),
        };
        if let (Some(StepKind::Transfer { .. }), Some(v)) =
            (kind, t.get("secrets").or_else(|| t.get("secret_env")))
        {
            self.error(v.span(), "a transfer runs no code: it takes no secrets");
        }
        let mut seen = HashSet::new();
        for n in &names {
            let name = n.get_ref();
            match &env.secrets {
                None => self.diags.push(
                    Diagnostic::error(n.span(), format!("secret `{name}` cannot be checked without the daemon config"))
                        .with_help(format!("secrets come from the daemon config: pass --config FILE, which must define [secrets.{name}]")),
                ),
                Some(known) if !known.contains(name) => {
                    let known: Vec<&str> = known.iter().map(String::as_str).collect();
                    let mut d = Diagnostic::error(n.span(), format!("unknown secret `{name}`"));
                    d = match closest(name, known.iter().copied()) {
                        Some(c) => d.with_help(format!(
                            "did you mean `{c}`? {}",
                            declared_list("secrets", &known)
                        )),
                        None => d.with_help(declared_list("secrets", &known)),
                    };
                    self.diags.push(d);
                }
                Some(_) => {}
            }
            if !seen.insert(name.clone()) {
                self.error(n.span(), format!("secret `{name}` is named twice"));
            }
        }
        for (var, secret) in &vars {
            if !valid_env_name(var.get_ref()) {
                self.error(
                    var.span(),
                    format!(
                        "`{}` is not a valid environment variable name",
                        var.get_ref()
                    ),
                );
            } else if var.get_ref().starts_with("MILLRACE_") {
                self.error(
                    var.span(),
                    format!(
                        "`{}`: the MILLRACE_ prefix is reserved for variables millrace sets",
                        var.get_ref()
                    ),
                );
            } else if env_vars.iter().any(|(k, _)| k.get_ref() == var.get_ref()) {
                self.error(
                    var.span(),
                    format!("`{}` is set by both `env` and `secret_env`", var.get_ref()),
                );
            }
            if !names.iter().any(|n| n.get_ref() == secret.get_ref()) {
                self.diags.push(
                    Diagnostic::error(
                        secret.span(),
                        format!(
                            "secret_env `{}` names `{}`, which is not in this step's `secrets`",
                            var.get_ref(),
                            secret.get_ref()
                        ),
                    )
                    .with_help(format!("add it: secrets = [\"{}\"]", secret.get_ref())),
                );
            }
        }
        (names, vars)
    }

    /// `foreach = "REFERENCE"`: the reference of one of the step's `inputs`,
    /// whose mount then holds one item at a time. Requiring the input (rather
    /// than mounting it implicitly) keeps one place that says where data is
    /// mounted.
    fn foreach(
        &mut self,
        f: &Value<'_>,
        inputs: &[(Sp<String>, Sp<Reference>)],
        step_name: &str,
    ) -> Option<Sp<String>> {
        let s = self.string(f, "foreach")?;
        let r = self.reference(&s)?;
        let mut mounts = inputs.iter().filter(|(_, i)| i.get_ref() == r.get_ref());
        match (mounts.next(), mounts.next()) {
            (Some((m, _)), None) => Some(Spanned::new(s.span(), m.get_ref().clone())),
            (None, _) => {
                let hint = match r.get_ref() {
                    Reference::Input(n) => n.clone(),
                    Reference::Output { output, .. } => output.clone(),
                };
                self.diags.push(
                    Diagnostic::error(
                        s.span(),
                        format!(
                            "step `{step_name}`: foreach `{}` is not one of its inputs",
                            s.get_ref()
                        ),
                    )
                    .with_help(format!(
                        "mount it too, e.g. inputs = {{ {hint} = \"{}\" }}: each item is mounted alone at that mount",
                        s.get_ref()
                    )),
                );
                None
            }
            (Some((a, _)), Some((b, _))) => {
                self.error(
                    s.span(),
                    format!(
                        "step `{step_name}`: foreach `{}` is mounted twice (`{}` and `{}`); mount it once",
                        s.get_ref(),
                        a.get_ref(),
                        b.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// `env = { NAME = "value" }`: interpolated values, names a process can carry,
    /// none in the MILLRACE_ namespace.
    fn step_env(
        &mut self,
        e: &Value<'_>,
        text: &str,
        params: &[Param],
        mounts: Mounts<'_>,
    ) -> Vec<(Sp<String>, Sp<String>)> {
        let env_vars = self.string_table(e, "env");
        for (k, v) in &env_vars {
            self.interpolation(v, text, params, mounts);
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
        env_vars
    }

    /// `params = ["c", "test_size"]`: declared params the step reads without
    /// interpolating them (a script reading `MILLRACE_PARAM_C`), each once.
    fn step_params(&mut self, v: &Value<'_>, params: &[Param]) -> Vec<Sp<String>> {
        let names = self.string_array(v, "params");
        let known: Vec<&str> = params.iter().map(|p| p.name.get_ref().as_str()).collect();
        let mut seen = HashSet::new();
        for n in &names {
            if !known.contains(&n.get_ref().as_str()) {
                let mut d = Diagnostic::error(n.span(), format!("unknown param `{}`", n.get_ref()));
                d = match closest(n.get_ref(), known.iter().copied()) {
                    Some(c) => d.with_help(format!(
                        "did you mean `{c}`? {}",
                        declared_list("params", &known)
                    )),
                    None => d.with_help(declared_list("params", &known)),
                };
                self.diags.push(d);
            } else if !seen.insert(n.get_ref().clone()) {
                self.error(n.span(), format!("param `{}` is named twice", n.get_ref()));
            }
        }
        names
    }

    /// `outputs = [...]`: names, each declared once.
    fn step_outputs(&mut self, o: &Value<'_>, step_name: &str) -> Vec<Sp<String>> {
        let outputs = self.string_array(o, "outputs");
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
        outputs
    }

    fn cpus(&mut self, c: &Value<'_>) -> Option<f64> {
        match c.get_ref() {
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
        }
    }

    /// `compute = "…"`: a target the daemon config declares, of a kind that can run
    /// this step.
    fn compute(&mut self, c: &Sp<String>, kind: &Option<StepKind>, env: &Environment) {
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

    /// The step keys a transfer step does not take (it runs no program).
    fn transfer_keys(&mut self, t: &DeTable<'_>) {
        for key in [
            "args", "env", "params", "outputs", "timeout", "memory", "cpus", "compute",
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

    fn step_kind(
        &mut self,
        kind: &str,
        v: &Value<'_>,
        step: &str,
        dir: &Path,
        env: &Environment,
    ) -> Option<StepKind> {
        match kind {
            "wasm" => self.wasm_step(v, dir),
            "python" => self.python_step(v, dir),
            "container" => self.container_step(v),
            "module" => self.module_step(v, step, env),
            "transfer" => self.transfer_step(v, env),
            _ => unreachable!("STEP_KINDS"),
        }
    }

    /// `wasm = "plugins/x.wasm"`, resolved against the pipeline's directory.
    fn wasm_step(&mut self, v: &Value<'_>, dir: &Path) -> Option<StepKind> {
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

    /// `python = "scripts/train.py"` or `python = { script, code, snapshot }`.
    fn python_step(&mut self, v: &Value<'_>, dir: &Path) -> Option<StepKind> {
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

    /// `module = "name@req"`, resolved against the registry.
    fn module_step(&mut self, v: &Value<'_>, step: &str, env: &Environment) -> Option<StepKind> {
        let spec = self.string(v, "module")?;
        match env.modules.resolve(spec.get_ref()) {
            Err(e) => {
                let mut d = Diagnostic::error(spec.span(), format!("step `{step}`: {}", e.message));
                if let Some(h) = e.help {
                    d = d.with_help(h);
                }
                self.diags.push(d);
                None
            }
            Ok(r) => {
                if let Some(w) = &r.warning {
                    self.diags.push(
                        Diagnostic::warning(spec.span(), format!("step `{step}`: {w}")).with_help(
                            format!(
                                "it still runs; pin another version of `{}` to silence this",
                                r.module.name
                            ),
                        ),
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

    /// `transfer = { from, to, datastore, mode }`.
    fn transfer_step(&mut self, v: &Value<'_>, env: &Environment) -> Option<StepKind> {
        let t = self.table(v, "transfer")?;
        self.unknown_keys(t, &["from", "to", "datastore", "mode"], "transfer");
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
        // A templated name is checked once resolved (see `paths`).
        if !super::paths::templated(datastore.get_ref()) {
            self.datastore(&datastore, env);
        }
        let mode = match t.get("mode").and_then(|m| self.string(m, "transfer.mode")) {
            None => TransferMode::Replace,
            Some(m) => match m.get_ref().as_str() {
                "replace" => TransferMode::Replace,
                "merge" => TransferMode::Merge,
                other => {
                    self.error(
                        m.span(),
                        format!("unknown transfer.mode `{other}`: expected replace or merge"),
                    );
                    TransferMode::Replace
                }
            },
        };
        Some(StepKind::Transfer {
            from: from?,
            to: to?,
            datastore,
            mode,
        })
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
}
