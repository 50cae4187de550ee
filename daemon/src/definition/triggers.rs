//! `[[trigger]]`: cron, watch and after, checked here and fired by the daemon.

use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::values::Mounts;
use super::walker::NameRule;
use super::{Environment, MAX_GLOB_CHARS, Param, ParamValue, Sp, Value, Walker};
use crate::diagnostic::{Diagnostic, Span};

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
    /// `watch = GLOB` in `datastore` (default `default`): relative to the
    /// datastore's directory, as an input's `path` is.
    Watch {
        glob: Sp<String>,
        datastore: Sp<String>,
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

impl Walker {
    /// `dir` is the pipeline's directory; `env` says where the datastores are.
    pub(super) fn trigger(
        &mut self,
        v: &Value<'_>,
        text: &str,
        params: &[Param],
        dir: &Path,
        env: &Environment,
    ) -> Option<Trigger> {
        let t = self.table(v, "trigger")?;
        let kinds: Vec<&str> = ["cron", "watch", "after"]
            .into_iter()
            .filter(|k| t.contains_key(*k))
            .collect();
        let allowed: &[&str] = match kinds.as_slice() {
            ["cron"] => &["cron", "timezone", "catchup", "params"],
            ["watch"] => &["watch", "datastore", "debounce", "params"],
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
            let datastore = t
                .get("datastore")
                .and_then(|d| self.string(d, "datastore"))
                .unwrap_or_else(|| Spanned::new(g.span(), "default".into()));
            let known = env.datastores.iter().any(|s| s == datastore.get_ref());
            self.datastore(&datastore, env);
            // `${params.NAME}` resolves now, with the trigger's own params over
            // the defaults: the daemon watches one fixed glob.
            self.interpolation(&glob, text, params, Mounts::Path);
            let defaults: Vec<(String, ParamValue)> = params
                .iter()
                .map(|p| (p.name.get_ref().clone(), p.value.clone()))
                .collect();
            let own: Vec<(String, ParamValue)> = trigger_params
                .iter()
                .map(|(k, v)| (k.get_ref().clone(), v.clone()))
                .collect();
            let resolved =
                super::resolve(glob.get_ref(), &super::paths::overridden(&defaults, &own));
            let glob = Sp::new(glob.span(), resolved);
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
            } else if known {
                self.watch_inside(&glob, &datastore, dir, env);
            }
            let debounce = t
                .get("debounce")
                .and_then(|d| self.timer_duration(d, "debounce"))
                .unwrap_or(Duration::from_secs(2));
            TriggerKind::Watch {
                glob,
                datastore,
                debounce,
            }
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

    /// A watch looks only inside a datastore or the pipeline's directory: a
    /// pipeline file must not turn the daemon into a watcher of `/etc`, and what
    /// it watches is what its inputs can read.
    fn watch_inside(
        &mut self,
        glob: &Sp<String>,
        datastore: &Sp<String>,
        dir: &Path,
        env: &Environment,
    ) {
        let paths = &env.datastore_paths;
        let Ok(files) = crate::trigger::watch::FileSet::in_datastore(
            glob.get_ref(),
            datastore.get_ref(),
            paths,
            dir,
        ) else {
            return; // check_glob reported it
        };
        let roots = paths.roots(dir);
        if !files.inside(&roots) {
            let roots: Vec<String> = roots
                .iter()
                .map(|r| crate::diagnostic::display_path(r))
                .collect();
            self.diags.push(
                Diagnostic::error(
                    glob.span(),
                    format!(
                        "the watch `{}` looks at {}, outside every datastore and the pipeline's directory",
                        glob.get_ref(),
                        crate::diagnostic::display_path(&files.base)
                    ),
                )
                .with_help(format!(
                    "a watch glob is relative to its datastore (`{}` is {}), as an input path is; it may look inside: {}",
                    datastore.get_ref(),
                    crate::diagnostic::display_path(&paths.path(datastore.get_ref(), dir)),
                    roots.join(", ")
                )),
            );
        }
    }
}
