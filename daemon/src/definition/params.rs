//! `[params]`: typed defaults, their overrides (a trigger's `params`, `--param`,
//! the API) and the rule every param value's text follows.

use toml::Spanned;
use toml::de::DeValue;

use super::walker::{NameRule, declared_list};
use super::{Pipeline, Sp, Value, Walker};
use crate::diagnostic::Diagnostic;

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

impl Walker {
    pub(super) fn params(&mut self, v: &Value<'_>) -> Vec<Param> {
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

    /// `params = { k = v }` overriding declared params with values of the same type.
    pub(super) fn param_overrides(
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
}

impl Pipeline {
    /// The params of a run: the declared defaults overridden by `overrides`.
    /// Refused when a path written with `${params.…}` would then leave its
    /// datastore (or name no datastore): checked before a run is created.
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
        self.check_locations(&values)?;
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
