//! Cache keys. A step's cache key is a BLAKE3 digest over its [`KeyParts`]: the
//! runtime and its version, the code digest, args and env after interpolation, the
//! params the step uses ([`Step::uses`]), the declared outputs and the content
//! digest of every input. No timestamp enters it. [`KeyParts`] is stored with each step so `explain` can name
//! the component that changed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::definition::{ParamValue, Step, StepKind, interpolate};

/// The components of a cache key, kept for `explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyParts {
    /// e.g. `wasm/wasmtime-48.0.8`.
    pub runtime: String,
    /// Digest of the code (wasm bytes); for a transfer, its destination.
    pub code: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The params the step uses ([`Step::uses`]), each visible to it as
    /// `MILLRACE_PARAM_*`; the run's other params are neither here nor there.
    pub params: BTreeMap<String, String>,
    pub outputs: Vec<String>,
    /// Input mount → artifact digest.
    pub inputs: BTreeMap<String, String>,
    /// A container step's settings that change what runs: command, entrypoint,
    /// workdir, user, network, root filesystem. (The image is `code`, by digest.)
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub container: BTreeMap<String, String>,
    /// The secrets the step reads, by name, and the variables it reads them
    /// through (`secret_env`). Never their values: rotating a password does not
    /// re-run a step (`--no-reuse` does). Absent when empty, so the keys of steps
    /// without secrets are those they always were.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, String>,
}

impl KeyParts {
    pub fn key(&self) -> String {
        let canonical = serde_json::to_string(self).expect("plain data serialises");
        // v2: `params` holds the params the step uses, not every param of the run.
        blake3::hash(format!("millrace-key-v2\n{canonical}").as_bytes())
            .to_hex()
            .to_string()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("plain data serialises")
    }

    /// Human-readable differences from an earlier execution's parts.
    pub fn changes_since(&self, old: &KeyParts) -> Vec<String> {
        let mut out = Vec::new();
        if self.runtime != old.runtime {
            out.push(format!(
                "runtime changed: {} → {}",
                old.runtime, self.runtime
            ));
        }
        if self.code != old.code {
            out.push(format!(
                "code changed: {} → {}",
                short(&old.code),
                short(&self.code)
            ));
        }
        if self.args != old.args {
            out.push(format!("args changed: {:?} → {:?}", old.args, self.args));
        }
        diff_maps("env", &old.env, &self.env, &mut out, |v| format!("{v:?}"));
        diff_maps("param", &old.params, &self.params, &mut out, |v| {
            v.to_string()
        });
        if self.outputs != old.outputs {
            out.push(format!(
                "declared outputs changed: {:?} → {:?}",
                old.outputs, self.outputs
            ));
        }
        diff_maps("input", &old.inputs, &self.inputs, &mut out, |v| {
            short(v).to_string()
        });
        diff_maps(
            "container",
            &old.container,
            &self.container,
            &mut out,
            |v| v.to_string(),
        );
        if self.secrets != old.secrets {
            out.push(format!(
                "secrets changed: {:?} → {:?}",
                old.secrets, self.secrets
            ));
        }
        diff_maps(
            "secret_env",
            &old.secret_env,
            &self.secret_env,
            &mut out,
            |v| v.to_string(),
        );
        out
    }
}

fn diff_maps(
    what: &str,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
    out: &mut Vec<String>,
    show: impl Fn(&str) -> String,
) {
    for (k, v) in new {
        match old.get(k) {
            None => out.push(format!("{what} `{k}` added ({})", show(v))),
            Some(o) if o != v => {
                out.push(format!("{what} `{k}` changed: {} → {}", show(o), show(v)))
            }
            _ => {}
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(*k)) {
        out.push(format!("{what} `{k}` removed"));
    }
}

/// The first 12 hex digits of a digest, as users see it.
pub fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

/// The environment variable name a param is exposed as.
pub fn param_env_name(param: &str) -> String {
    format!(
        "MILLRACE_PARAM_{}",
        param.to_ascii_uppercase().replace('-', "_")
    )
}

/// The `MILLRACE_PARAM_*` variables of step `step` in a run with `params`: one
/// for each param the step uses, exactly those in its key.
pub fn param_env(step: &Step, params: &[(String, ParamValue)]) -> Vec<(String, String)> {
    step.scoped_params(params)
        .iter()
        .map(|(k, v)| (param_env_name(k), v.to_string()))
        .collect()
}

/// The lookup `${params.NAME}` expands by: the params the step uses.
fn lookup(scoped: &[(String, ParamValue)]) -> impl Fn(&str) -> Option<String> + '_ {
    |name: &str| {
        scoped
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_string())
    }
}

/// A step's args and env after interpolation (`${params.x}`, `${inputs.m}`,
/// `${outputs.o}`).
pub fn interpolated(
    step: &Step,
    params: &[(String, ParamValue)],
) -> (Vec<String>, BTreeMap<String, String>) {
    let scoped = step.scoped_params(params);
    let lookup = lookup(&scoped);
    let args = step
        .args
        .iter()
        .map(|a| interpolate(a.get_ref(), &lookup))
        .collect();
    // A container's own env first: the step's `env` wins on a clash.
    let container_env = match &step.kind {
        StepKind::Container(c) => &c.env[..],
        _ => &[],
    };
    let env = container_env
        .iter()
        .chain(&step.env)
        .map(|(k, v)| (k.get_ref().clone(), interpolate(v.get_ref(), &lookup)))
        .collect();
    (args, env)
}

/// A container's command: `command` (interpolated) then the step's `args`; `None`
/// (the image's CMD) when both are empty.
pub fn container_command(
    step: &Step,
    params: &[(String, ParamValue)],
    args: &[String],
) -> Option<Vec<String>> {
    let StepKind::Container(c) = &step.kind else {
        return None;
    };
    let scoped = step.scoped_params(params);
    let lookup = lookup(&scoped);
    let mut cmd: Vec<String> = c
        .command
        .iter()
        .flatten()
        .map(|a| interpolate(a.get_ref(), &lookup))
        .collect();
    cmd.extend(args.iter().cloned());
    (c.command.is_some() || !cmd.is_empty()).then_some(cmd)
}

/// A container's `entrypoint`, `workdir` and `user`, interpolated.
pub struct ContainerSettings {
    pub entrypoint: Option<Vec<String>>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

pub fn container_settings_of(
    step: &Step,
    params: &[(String, ParamValue)],
) -> Option<ContainerSettings> {
    let StepKind::Container(c) = &step.kind else {
        return None;
    };
    let scoped = step.scoped_params(params);
    let lookup = lookup(&scoped);
    let one = |s: &crate::definition::Sp<String>| interpolate(s.get_ref(), &lookup);
    Some(ContainerSettings {
        entrypoint: c.entrypoint.as_ref().map(|e| e.iter().map(one).collect()),
        workdir: c.workdir.as_ref().map(one),
        user: c.user.as_ref().map(one),
    })
}

/// The container settings that enter a step's key (see [`KeyParts::container`]).
fn container_settings(
    step: &Step,
    params: &[(String, ParamValue)],
    args: &[String],
) -> BTreeMap<String, String> {
    let StepKind::Container(c) = &step.kind else {
        return BTreeMap::new();
    };
    let json = |v: &[String]| serde_json::to_string(v).expect("strings serialise");
    let mut m = BTreeMap::new();
    m.insert(
        "command".into(),
        container_command(step, params, args)
            .map(|c| json(&c))
            .unwrap_or_else(|| "(image CMD)".into()),
    );
    if let Some(s) = container_settings_of(step, params) {
        if let Some(e) = &s.entrypoint {
            m.insert("entrypoint".into(), json(e));
        }
        if let Some(w) = s.workdir {
            m.insert("workdir".into(), w);
        }
        if let Some(u) = s.user {
            m.insert("user".into(), u);
        }
    }
    m.insert(
        "network".into(),
        if c.network { "bridge" } else { "none" }.into(),
    );
    m.insert(
        "root".into(),
        if c.read_only_root {
            "read-only"
        } else {
            "writable"
        }
        .into(),
    );
    m
}

/// The key parts of a step, given its code digest and its inputs' digests.
pub fn key_parts(
    step: &Step,
    params: &[(String, ParamValue)],
    code: &str,
    inputs: BTreeMap<String, String>,
) -> KeyParts {
    let (args, env) = interpolated(step, params);
    let container = container_settings(step, params, &args);
    let runtime = match &step.kind {
        StepKind::Module { module, .. } if module.kind == "python" => {
            format!(
                "python/wasmtime-{}",
                crate::executor::wasm::WASMTIME_VERSION
            )
        }
        StepKind::Wasm { .. } | StepKind::Module { .. } => {
            format!("wasm/wasmtime-{}", crate::executor::wasm::WASMTIME_VERSION)
        }
        StepKind::Python { .. } => {
            format!(
                "python/wasmtime-{}",
                crate::executor::wasm::WASMTIME_VERSION
            )
        }
        other => other.runtime_name().to_string(),
    };
    KeyParts {
        runtime,
        code: code.to_string(),
        args,
        env,
        params: step
            .scoped_params(params)
            .iter()
            .map(|(k, v)| (k.clone(), format!("{}:{v}", v.type_name())))
            .collect(),
        outputs: step.outputs.iter().map(|o| o.get_ref().clone()).collect(),
        inputs,
        container,
        secrets: {
            let mut names: Vec<String> = step.secrets.iter().map(|s| s.get_ref().clone()).collect();
            names.sort();
            names
        },
        secret_env: step
            .secret_env
            .iter()
            .map(|(k, v)| (k.get_ref().clone(), v.get_ref().clone()))
            .collect(),
    }
}

/// Params of a run as JSON, for the run record.
pub fn params_json(params: &[(String, ParamValue)]) -> serde_json::Value {
    serde_json::Value::Object(
        params
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> KeyParts {
        KeyParts {
            runtime: "wasm/wasmtime-48.0.8".into(),
            code: "aaaa".into(),
            args: vec!["--x".into()],
            env: BTreeMap::new(),
            params: BTreeMap::from([("c".into(), "float:0.5".into())]),
            outputs: vec!["out".into()],
            inputs: BTreeMap::from([("data".into(), "bbbb".into())]),
            container: BTreeMap::new(),
            secrets: Vec::new(),
            secret_env: BTreeMap::new(),
        }
    }

    #[test]
    fn the_key_changes_with_every_component_and_explains_which() {
        let a = parts();
        let mut b = parts();
        assert_eq!(a.key(), b.key());
        b.inputs.insert("data".into(), "cccc".into());
        assert_ne!(a.key(), b.key());
        assert_eq!(
            b.changes_since(&a),
            vec!["input `data` changed: bbbb → cccc"]
        );
        let mut c = parts();
        c.params.insert("c".into(), "float:0.7".into());
        assert_eq!(
            c.changes_since(&a),
            vec!["param `c` changed: float:0.5 → float:0.7"]
        );
    }

    fn pipeline(text: &str) -> crate::definition::Pipeline {
        let (p, report) = crate::graph::parse(
            std::path::Path::new("/nowhere/p.toml"),
            text.into(),
            &crate::definition::Environment::default(),
        );
        p.unwrap_or_else(|| panic!("{report}"))
    }

    #[test]
    fn a_key_and_the_environment_hold_only_the_params_the_step_uses() {
        let p = pipeline(
            r#"
[params]
a = 1
b = "x"
day = "2026-11-30"
unused = true
[inputs.daily]
path = "data/${params.day}"
[[step]]
name = "cmd"
container = { image = "img", command = ["run", "${params.a}"] }
params = ["b"]
outputs = ["o"]
[[step]]
name = "reads"
container = { image = "img" }
inputs = { d = "inputs.daily" }
[[step]]
name = "publish"
transfer = { from = "cmd.o", to = "out/${params.day}" }
"#,
        );
        let run: Vec<(String, ParamValue)> = vec![
            ("a".into(), ParamValue::Integer(2)),
            ("b".into(), ParamValue::String("y".into())),
            ("day".into(), ParamValue::String("2026-12-01".into())),
            ("unused".into(), ParamValue::Bool(false)),
        ];
        let params = |i: usize| {
            let k = key_parts(&p.steps[i], &run, "code", BTreeMap::new());
            let env: Vec<String> = param_env(&p.steps[i], &run)
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            (k.params.into_iter().collect::<Vec<_>>(), env)
        };
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            params(0),
            (
                vec![pair("a", "integer:2"), pair("b", "string:y")],
                vec!["MILLRACE_PARAM_A=2".into(), "MILLRACE_PARAM_B=y".into()]
            )
        );
        // Through the path of the input it reads.
        assert_eq!(
            params(1),
            (
                vec![pair("day", "string:2026-12-01")],
                vec!["MILLRACE_PARAM_DAY=2026-12-01".into()]
            )
        );
        assert_eq!(params(2).0, vec![pair("day", "string:2026-12-01")]);
        assert_eq!(
            p.steps[2].transfer_location(&run),
            Some(("default".into(), "out/2026-12-01".into()))
        );
        // A param nobody uses changes no key.
        let mut other = run.clone();
        other[3].1 = ParamValue::Bool(true);
        for (i, s) in p.steps.iter().enumerate() {
            assert_eq!(
                key_parts(s, &run, "code", BTreeMap::new()).key(),
                key_parts(s, &other, "code", BTreeMap::new()).key(),
                "step {i}"
            );
        }
    }
}
