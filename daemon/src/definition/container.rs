//! `container = {…}`: what an OS-image step runs.

use toml::de::DeValue;

use super::{Sp, StepKind, Value, Walker};
use crate::diagnostic::Diagnostic;

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

impl Walker {
    /// `container = { image, command, entrypoint, env, workdir, user, network,
    /// read_only_root }`.
    pub(super) fn container_step(&mut self, v: &Value<'_>) -> Option<StepKind> {
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
        // `${inputs.m}` and `${outputs.o}` are absolute (`/in/m`, `/out/o`); a
        // param is not known to be, so it goes after a `/`.
        if let Some(w) = &workdir
            && !super::interpolate(w.get_ref(), &|_| Some("x".into())).starts_with('/')
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
}
