//! `${params.NAME}` beyond a step's args and env: in the paths a pipeline names
//! (an input's `path` and `datastore`, a transfer's `to` and `datastore`) and in
//! container settings; where each such path lands once resolved; and which
//! params each step uses ([`Step::uses`]), the one set its key and its
//! environment are built from.

use std::collections::BTreeSet;
use std::path::{Component, Path};

use super::values::Mounts;
use super::{
    Input, Param, ParamValue, Piece, Pipeline, Reference, Sp, Step, StepKind, Walker, interpolate,
    interpolation_pieces,
};
use crate::diagnostic::{Diagnostic, Span};

/// Expands `${params.NAME}` in `template` with `params` (a name not among them
/// expands to nothing; validation refuses such names).
pub fn resolve(template: &str, params: &[(String, ParamValue)]) -> String {
    interpolate(template, &|name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_string())
    })
}

/// Whether a string interpolates anything (and so may resolve differently per run).
pub(super) fn templated(s: &str) -> bool {
    interpolation_pieces(s)
        .iter()
        .any(|p| !matches!(p, Piece::Literal(_)))
}

/// The params `s` interpolates, added to `out`.
fn params_in(s: &str, out: &mut BTreeSet<String>) {
    for p in interpolation_pieces(s) {
        if let Piece::Param { name, .. } = p {
            out.insert(name.to_string());
        }
    }
}

/// Why a resolved path leaves its datastore, if it does: absolute, a `..`
/// component, or empty. `exact` also refuses `.` (a transfer's destination is
/// a directory of its own, never the datastore itself).
fn escapes(path: &str, exact: bool) -> Option<&'static str> {
    let p = Path::new(path);
    if path.is_empty() {
        return Some("is empty");
    }
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, Component::RootDir | Component::Prefix(_)))
    {
        return Some("is absolute");
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Some("has a `..` component");
    }
    if exact && p.components().any(|c| c == Component::CurDir) {
        return Some("has a `.` component");
    }
    None
}

/// Where a pipeline path is written, for its messages.
struct Located<'a> {
    /// e.g. "input `data` path", "step `publish` transfer.to".
    what: String,
    template: &'a Sp<String>,
    /// A datastore name rather than a path.
    datastore: bool,
    /// A transfer's destination: only normal components.
    exact: bool,
}

impl Pipeline {
    /// Every path and datastore name the pipeline writes with `${params.…}`.
    fn templated_locations(&self) -> Vec<Located<'_>> {
        let mut out = Vec::new();
        for i in &self.inputs {
            let name = i.name.get_ref();
            out.push(Located {
                what: format!("input `{name}` path"),
                template: &i.path,
                datastore: false,
                exact: false,
            });
            out.push(Located {
                what: format!("input `{name}` datastore"),
                template: &i.datastore,
                datastore: true,
                exact: false,
            });
        }
        for s in &self.steps {
            if let StepKind::Transfer { to, datastore, .. } = &s.kind {
                let name = s.name.get_ref();
                out.push(Located {
                    what: format!("step `{name}` transfer.to"),
                    template: to,
                    datastore: false,
                    exact: true,
                });
                out.push(Located {
                    what: format!("step `{name}` transfer.datastore"),
                    template: datastore,
                    datastore: true,
                    exact: false,
                });
            }
        }
        out.retain(|l| templated(l.template.get_ref()));
        out
    }

    /// Checks that every templated path, resolved with `params` (a run's), stays
    /// inside its datastore, and every templated datastore name is one the daemon
    /// config declares: a run whose `--param day=../../etc` would read or write
    /// outside is refused before anything runs.
    pub fn check_locations(&self, params: &[(String, ParamValue)]) -> Result<(), String> {
        match self.location_errors(params).into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    fn location_errors(&self, params: &[(String, ParamValue)]) -> Vec<(Span, String)> {
        let mut out = Vec::new();
        for l in self.templated_locations() {
            let template = l.template.get_ref();
            let resolved = resolve(template, params);
            let problem = if l.datastore {
                (!self.datastores.contains(&resolved)).then(|| {
                    format!(
                        "is not a datastore (datastores: {})",
                        self.datastores.join(", ")
                    )
                })
            } else {
                escapes(&resolved, l.exact)
                    .map(|why| format!("{why}: it would leave its datastore"))
            };
            if let Some(problem) = problem {
                let used: Vec<String> = {
                    let mut names = BTreeSet::new();
                    params_in(template, &mut names);
                    names
                        .iter()
                        .filter_map(|n| {
                            params
                                .iter()
                                .find(|(k, _)| k == n)
                                .map(|(k, v)| format!("{k} = {:?}", v.to_string()))
                        })
                        .collect()
                };
                out.push((
                    l.template.span(),
                    format!(
                        "{} `{template}` resolves to `{}` (with {}), which {problem}",
                        l.what,
                        resolved.escape_debug(),
                        used.join(", ")
                    ),
                ));
            }
        }
        out
    }

    /// Input `input`'s datastore and path under a run's params.
    pub fn input_location(
        &self,
        input: &Input,
        params: &[(String, ParamValue)],
    ) -> (String, String) {
        (
            resolve(input.datastore.get_ref(), params),
            resolve(input.path.get_ref(), params),
        )
    }
}

impl Step {
    /// The run's params this step uses ([`Step::uses`]), in `params`' order: what
    /// enters its key and its environment, and nothing else.
    pub fn scoped_params(&self, params: &[(String, ParamValue)]) -> Vec<(String, ParamValue)> {
        params
            .iter()
            .filter(|(k, _)| self.uses.binary_search(k).is_ok())
            .cloned()
            .collect()
    }

    /// A transfer's datastore and destination under a run's params.
    pub fn transfer_location(&self, params: &[(String, ParamValue)]) -> Option<(String, String)> {
        match &self.kind {
            StepKind::Transfer { to, datastore, .. } => Some((
                resolve(datastore.get_ref(), params),
                resolve(to.get_ref(), params),
            )),
            _ => None,
        }
    }

    /// Every string of the step that is interpolated: args, env values, container
    /// settings, a transfer's destination.
    fn interpolated_strings(&self) -> Vec<&Sp<String>> {
        let mut out: Vec<&Sp<String>> = self.args.iter().collect();
        out.extend(self.env.iter().map(|(_, v)| v));
        match &self.kind {
            StepKind::Container(c) => {
                out.extend(c.command.iter().flatten());
                out.extend(c.entrypoint.iter().flatten());
                out.extend(c.workdir.iter());
                out.extend(c.user.iter());
                out.extend(c.env.iter().map(|(_, v)| v));
            }
            StepKind::Transfer { to, datastore, .. } => {
                out.push(to);
                out.push(datastore);
            }
            _ => {}
        }
        out
    }
}

/// The params step `s` uses: named in `params`, interpolated in its strings or in
/// the location of a pipeline input it reads.
fn uses(s: &Step, inputs: &[Input]) -> Vec<String> {
    let mut used: BTreeSet<String> = s.params.iter().map(|p| p.get_ref().clone()).collect();
    for text in s.interpolated_strings() {
        params_in(text.get_ref(), &mut used);
    }
    for (_, r) in s.references() {
        if let Reference::Input(name) = r.get_ref()
            && let Some(i) = inputs.iter().find(|i| i.name.get_ref() == name)
        {
            params_in(i.path.get_ref(), &mut used);
            params_in(i.datastore.get_ref(), &mut used);
        }
    }
    used.into_iter().collect()
}

impl Walker {
    /// After the walk, what needs the whole pipeline: interpolations in paths and
    /// container settings, templated paths resolved under the defaults and under
    /// each trigger's params, and each step's [`Step::uses`].
    pub(super) fn scope(&mut self, p: &mut Pipeline, text: &str) {
        let params: &[Param] = &p.params;
        for i in &p.inputs {
            self.interpolation(&i.path, text, params, Mounts::Path);
            self.interpolation(&i.datastore, text, params, Mounts::Path);
        }
        for s in &p.steps {
            match &s.kind {
                StepKind::Transfer { to, datastore, .. } => {
                    self.interpolation(to, text, params, Mounts::Path);
                    self.interpolation(datastore, text, params, Mounts::Path);
                }
                StepKind::Container(_) => {
                    let mount_names: Vec<&str> =
                        s.inputs.iter().map(|(m, _)| m.get_ref().as_str()).collect();
                    let output_names: Vec<&str> =
                        s.outputs.iter().map(|o| o.get_ref().as_str()).collect();
                    let mounts = Mounts::Step {
                        inputs: &mount_names,
                        outputs: &output_names,
                    };
                    // Args and env were checked with the step.
                    let skip = s.args.len() + s.env.len();
                    for t in s.interpolated_strings().into_iter().skip(skip) {
                        self.interpolation(t, text, params, mounts);
                    }
                }
                _ => {}
            }
        }
        // Resolved under the defaults, then under each trigger's params: only the
        // first problem of a path is reported.
        let defaults: Vec<(String, ParamValue)> = params
            .iter()
            .map(|p| (p.name.get_ref().clone(), p.value.clone()))
            .collect();
        let mut sets = vec![defaults.clone()];
        sets.extend(p.triggers.iter().map(|t| {
            let own: Vec<(String, ParamValue)> = t
                .params
                .iter()
                .map(|(k, v)| (k.get_ref().clone(), v.clone()))
                .collect();
            overridden(&defaults, &own)
        }));
        let mut reported = BTreeSet::new();
        for set in &sets {
            for (span, message) in p.location_errors(set) {
                if reported.insert((span.start, span.end)) {
                    self.diags.push(Diagnostic::error(span, message).with_help(
                        "a path is relative to its datastore and stays inside it; a datastore is one the daemon config declares",
                    ));
                }
            }
        }
        let inputs = p.inputs.clone();
        for s in &mut p.steps {
            s.uses = uses(s, &inputs);
        }
    }
}

impl Walker {
    /// A Python step's code directory is part of its key (`/code` is a snapshot of
    /// it), so data kept inside it (a pipeline input, a transfer's destination)
    /// re-executes the step at every change of that data: each drop into an inbox
    /// beside the script would re-score the whole inbox. Said once per step, at its
    /// `python`, with the way out.
    pub(super) fn code_beside_data(&mut self, p: &Pipeline, env: &super::Environment) {
        let lexical = |path: &std::path::Path| -> std::path::PathBuf {
            path.components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect()
        };
        let mut data: Vec<(String, std::path::PathBuf)> = Vec::new();
        for i in &p.inputs {
            if !templated(i.path.get_ref()) && !templated(i.datastore.get_ref()) {
                let at = env
                    .datastore_paths
                    .path(i.datastore.get_ref(), &p.dir)
                    .join(i.path.get_ref());
                data.push((format!("input `{}`", i.name.get_ref()), lexical(&at)));
            }
        }
        for s in &p.steps {
            if let StepKind::Transfer { to, datastore, .. } = &s.kind
                && !templated(to.get_ref())
                && !templated(datastore.get_ref())
            {
                let at = env
                    .datastore_paths
                    .path(datastore.get_ref(), &p.dir)
                    .join(to.get_ref());
                data.push((
                    format!("step `{}`'s destination", s.name.get_ref()),
                    lexical(&at),
                ));
            }
        }
        for s in &p.steps {
            let StepKind::Python {
                script,
                code_dir,
                entry,
                ..
            } = &s.kind
            else {
                continue;
            };
            let code = lexical(code_dir);
            let inside: Vec<String> = data
                .iter()
                .filter(|(_, at)| at.starts_with(&code))
                .map(|(what, at)| format!("{what} ({})", crate::diagnostic::display_path(at)))
                .collect();
            if inside.is_empty() {
                continue;
            }
            let shown = if code == lexical(&p.dir) {
                "(the pipeline's directory)".to_string()
            } else {
                crate::diagnostic::display_path(code_dir)
            };
            self.diags.push(
                Diagnostic::warning(
                    script.span(),
                    format!(
                        "step `{}`'s code directory {shown} holds data: {}; every change to it changes the step's code, so the step executes again each time",
                        s.name.get_ref(),
                        inside.join(", ")
                    ),
                )
                .with_help(format!(
                    "give the script a directory of its own: python = {{ script = \"{entry}\", code = \"src\" }}"
                )),
            );
        }
    }
}

impl Walker {
    /// A Python script that reads `MILLRACE_PARAM_X` for a declared param `x` its
    /// step does not use sees no such variable (a step's environment holds only
    /// the params it uses): said at the step's `python`, with the `params = [...]`
    /// that fixes it. Only the entry script is read, as text (its first MiB).
    pub(super) fn params_read_but_not_used(&mut self, p: &Pipeline) {
        const PREFIX: &str = "MILLRACE_PARAM_";
        for s in &p.steps {
            let StepKind::Python {
                script,
                code_dir,
                entry,
                ..
            } = &s.kind
            else {
                continue;
            };
            let Ok(f) = std::fs::File::open(code_dir.join(entry)) else {
                continue;
            };
            let mut text = String::new();
            if std::io::Read::read_to_string(&mut std::io::Read::take(f, 1 << 20), &mut text)
                .is_err()
            {
                continue;
            }
            let mut missing: Vec<String> = Vec::new();
            for (at, _) in text.match_indices(PREFIX) {
                let var: String = text[at + PREFIX.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let Some(param) = p
                    .params
                    .iter()
                    .find(|q| q.name.get_ref().to_ascii_uppercase().replace('-', "_") == var)
                else {
                    continue;
                };
                let name = param.name.get_ref();
                if !s.uses.contains(name) && !missing.contains(name) {
                    missing.push(name.clone());
                }
            }
            if missing.is_empty() {
                continue;
            }
            let quoted: Vec<String> = missing.iter().map(|m| format!("\"{m}\"")).collect();
            let vars: Vec<String> = missing
                .iter()
                .map(|m| format!("{PREFIX}{}", m.to_ascii_uppercase().replace('-', "_")))
                .collect();
            self.diags.push(
                Diagnostic::warning(
                    script.span(),
                    format!(
                        "step `{}`'s script {entry} reads {}, but the step does not use {}: its environment holds only the params it uses",
                        s.name.get_ref(),
                        vars.join(", "),
                        missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")
                    ),
                )
                .with_help(format!("name them on the step: params = [{}]", quoted.join(", "))),
            );
        }
    }
}

/// `defaults` with `own` (a trigger's params) over them.
pub(super) fn overridden(
    defaults: &[(String, ParamValue)],
    own: &[(String, ParamValue)],
) -> Vec<(String, ParamValue)> {
    let mut out = defaults.to_vec();
    for (k, v) in own {
        if let Some(slot) = out.iter_mut().find(|(n, _)| n == k) {
            slot.1 = v.clone();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escapes;

    #[test]
    fn a_resolved_path_stays_inside_its_datastore() {
        assert_eq!(escapes("data/2026-11-30", false), None);
        // `data/${params.day}` with day = "/etc" is `data//etc`: still inside.
        assert_eq!(escapes("data//etc", false), None);
        assert_eq!(escapes("/etc", false), Some("is absolute"));
        assert_eq!(
            escapes("data/../../etc", false),
            Some("has a `..` component")
        );
        assert_eq!(escapes("", false), Some("is empty"));
        assert_eq!(escapes("./data", false), None);
        assert_eq!(escapes("./out", true), Some("has a `.` component"));
    }
}
