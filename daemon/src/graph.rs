//! The execution graph: steps connected by their data references (`step.output`) and
//! `after` edges. [`check`] reports every bad reference and names each cycle;
//! [`Graph`] is the validated DAG the planner and the run walk.

use std::collections::HashMap;
use std::fmt::Write;

use crate::definition::{Pipeline, Reference, Sp, StepKind};
use crate::diagnostic::{Diagnostic, closest};

/// Whole-pipeline checks: duplicate steps, references, `after`, cycles.
pub fn check(p: &Pipeline, diags: &mut Vec<Diagnostic>) {
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, s) in p.steps.iter().enumerate() {
        if let Some(&j) = first.get(s.name.get_ref().as_str()) {
            diags.push(
                Diagnostic::error(
                    s.name.span(),
                    format!("step `{}` is declared twice", s.name.get_ref()),
                )
                .with_help(format!(
                    "the first `{}` is step number {}",
                    s.name.get_ref(),
                    j + 1
                )),
            );
        } else {
            first.insert(s.name.get_ref(), i);
        }
    }
    let step_names: Vec<&str> = p.steps.iter().map(|s| s.name.get_ref().as_str()).collect();
    for s in &p.steps {
        for (_, r) in s.references() {
            check_reference(p, s.name.get_ref(), r, &step_names, diags);
        }
        for a in &s.after {
            if a.get_ref() == s.name.get_ref() {
                diags.push(Diagnostic::error(
                    a.span(),
                    format!("step `{}` cannot run after itself", a.get_ref()),
                ));
            } else if p.step(a.get_ref()).is_none() {
                diags.push(unknown_step(a.get_ref(), a.span(), &step_names));
            }
        }
    }
    let used: std::collections::HashSet<&str> = p
        .steps
        .iter()
        .flat_map(|s| s.references())
        .filter_map(|(_, r)| match r.get_ref() {
            Reference::Input(name) => Some(name.as_str()),
            Reference::Output { .. } => None,
        })
        .collect();
    for input in &p.inputs {
        if !used.contains(input.name.get_ref().as_str()) {
            diags.push(Diagnostic::warning(
                input.name.span(),
                format!("input `{}` is not used by any step", input.name.get_ref()),
            ));
        }
    }
    if diags
        .iter()
        .any(|d| d.severity == crate::diagnostic::Severity::Error)
    {
        return; // cycles are only meaningful once every edge points somewhere
    }
    for cycle in Graph::edges(p).cycles() {
        let names: Vec<&str> = cycle
            .iter()
            .map(|&i| p.steps[i].name.get_ref().as_str())
            .collect();
        let mut path = names.join(" -> ");
        path += &format!(" -> {}", names[0]);
        diags.push(
            Diagnostic::error(
                p.steps[cycle[0]].name.span(),
                format!("cycle in the step graph: [ {path} ]"),
            )
            .with_help("a step cannot depend, directly or through others, on its own outputs"),
        );
    }
}

fn check_reference(
    p: &Pipeline,
    step: &str,
    r: &Sp<Reference>,
    steps: &[&str],
    diags: &mut Vec<Diagnostic>,
) {
    match r.get_ref() {
        Reference::Input(name) => {
            if p.input(name).is_none() {
                let known: Vec<&str> = p.inputs.iter().map(|i| i.name.get_ref().as_str()).collect();
                let mut d =
                    Diagnostic::error(r.span(), format!("unknown pipeline input `inputs.{name}`"));
                d = match closest(name, known.iter().copied()) {
                    Some(c) => d.with_help(format!("did you mean `inputs.{c}`?")),
                    None if known.is_empty() => {
                        d.with_help("declare it with an [inputs.NAME] table and a `path`")
                    }
                    None => d.with_help(format!("declared inputs: {}", known.join(", "))),
                };
                diags.push(d);
            }
        }
        Reference::Output { step: from, output } => {
            if from == step {
                diags.push(Diagnostic::error(
                    r.span(),
                    format!("step `{step}` cannot read its own output `{output}`"),
                ));
                return;
            }
            let Some(source) = p.step(from) else {
                diags.push(unknown_step(from, r.span(), steps));
                return;
            };
            if !source.outputs.iter().any(|o| o.get_ref() == output) {
                let known: Vec<&str> = source
                    .outputs
                    .iter()
                    .map(|o| o.get_ref().as_str())
                    .collect();
                let mut d =
                    Diagnostic::error(r.span(), format!("step `{from}` has no output `{output}`"));
                d = match closest(output, known.iter().copied()) {
                    Some(c) => d.with_help(format!("did you mean `{from}.{c}`?")),
                    None if known.is_empty() => {
                        d.with_help(format!("step `{from}` declares no outputs"))
                    }
                    None => d.with_help(format!("outputs of `{from}`: {}", known.join(", "))),
                };
                diags.push(d);
            }
        }
    }
}

fn unknown_step(name: &str, span: std::ops::Range<usize>, steps: &[&str]) -> Diagnostic {
    let d = Diagnostic::error(span, format!("unknown step `{name}`"));
    match closest(name, steps.iter().copied()) {
        Some(c) => d.with_help(format!("did you mean `{c}`?")),
        None => d.with_help(format!("steps: {}", steps.join(", "))),
    }
}

/// The validated DAG over a pipeline's steps (by index into `Pipeline::steps`).
#[derive(Debug, Clone)]
pub struct Graph {
    /// `deps[i]`: the steps step `i` waits for, without duplicates.
    pub deps: Vec<Vec<usize>>,
    /// `dependants[i]`: the steps that wait for step `i`.
    pub dependants: Vec<Vec<usize>>,
    /// A topological order (file order among independent steps).
    pub order: Vec<usize>,
}

impl Graph {
    /// Builds the graph of a pipeline that passed [`check`].
    pub fn new(p: &Pipeline) -> Graph {
        let mut g = Graph::edges(p);
        g.order = g.topological_order();
        g
    }

    fn edges(p: &Pipeline) -> Graph {
        let index: HashMap<&str, usize> = p
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.get_ref().as_str(), i))
            .collect();
        let n = p.steps.len();
        let mut deps = vec![Vec::new(); n];
        for (i, s) in p.steps.iter().enumerate() {
            let from_data = s.references().filter_map(|(_, r)| match r.get_ref() {
                Reference::Output { step, .. } => index.get(step.as_str()).copied(),
                Reference::Input(_) => None,
            });
            let from_after = s
                .after
                .iter()
                .filter_map(|a| index.get(a.get_ref().as_str()).copied());
            for d in from_data.chain(from_after) {
                if !deps[i].contains(&d) && d != i {
                    deps[i].push(d);
                }
            }
        }
        let mut dependants = vec![Vec::new(); n];
        for (i, ds) in deps.iter().enumerate() {
            for &d in ds {
                dependants[d].push(i);
            }
        }
        Graph {
            deps,
            dependants,
            order: Vec::new(),
        }
    }

    /// Kahn's algorithm; steps left over are on cycles (excluded by [`check`]).
    fn topological_order(&self) -> Vec<usize> {
        let mut waiting: Vec<usize> = self.deps.iter().map(Vec::len).collect();
        let mut ready: std::collections::BTreeSet<usize> =
            (0..waiting.len()).filter(|&i| waiting[i] == 0).collect();
        let mut order = Vec::with_capacity(waiting.len());
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &d in &self.dependants[i] {
                waiting[d] -= 1;
                if waiting[d] == 0 {
                    ready.insert(d);
                }
            }
        }
        order
    }

    /// Every elementary cycle found by one depth-first walk (each reported once),
    /// as the steps along it in dependency order.
    fn cycles(&self) -> Vec<Vec<usize>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Active,
            Done,
        }
        let n = self.deps.len();
        let mut mark = vec![Mark::New; n];
        let mut cycles = Vec::new();
        for root in 0..n {
            if mark[root] != Mark::New {
                continue;
            }
            // Iterative DFS along "depends on" edges; `path` is the active chain.
            let mut path: Vec<usize> = vec![root];
            let mut next_edge: Vec<usize> = vec![0];
            mark[root] = Mark::Active;
            while let Some(&node) = path.last() {
                let e = next_edge.last_mut().expect("parallel stacks");
                if let Some(&d) = self.deps[node].get(*e) {
                    *e += 1;
                    match mark[d] {
                        Mark::New => {
                            mark[d] = Mark::Active;
                            path.push(d);
                            next_edge.push(0);
                        }
                        Mark::Active => {
                            let start = path
                                .iter()
                                .position(|&x| x == d)
                                .expect("active nodes are on the path");
                            // path runs dependant → dependency; print dependency first.
                            let mut cycle: Vec<usize> = path[start..].to_vec();
                            cycle.reverse();
                            cycles.push(cycle);
                        }
                        Mark::Done => {}
                    }
                } else {
                    mark[node] = Mark::Done;
                    path.pop();
                    next_edge.pop();
                }
            }
        }
        cycles
    }

    /// Renders the graph as `text`, `dot` or `mermaid`.
    pub fn render(&self, p: &Pipeline, format: GraphFormat) -> String {
        let mut out = String::new();
        let edges = || {
            self.order.iter().flat_map(move |&i| {
                let s = &p.steps[i];
                self.deps[i].iter().map(move |&d| {
                    let label: Vec<String> = s
                        .references()
                        .filter_map(|(_, r)| match r.get_ref() {
                            Reference::Output { step, output }
                                if step == p.steps[d].name.get_ref() =>
                            {
                                Some(output.clone())
                            }
                            _ => None,
                        })
                        .collect();
                    (d, i, label.join(", "))
                })
            })
        };
        let input_edges = || {
            self.order.iter().flat_map(move |&i| {
                let s = &p.steps[i];
                s.references().filter_map(move |(_, r)| match r.get_ref() {
                    Reference::Input(name) => Some((name.clone(), i)),
                    _ => None,
                })
            })
        };
        match format {
            GraphFormat::Text => {
                let _ = writeln!(
                    out,
                    "pipeline {} ({} steps)",
                    p.name.get_ref(),
                    p.steps.len()
                );
                let width = p
                    .steps
                    .iter()
                    .map(|s| s.name.get_ref().len())
                    .max()
                    .unwrap_or(0);
                for &i in &self.order {
                    let s = &p.steps[i];
                    let mut from: Vec<String> = s
                        .inputs
                        .iter()
                        .map(|(m, r)| format!("{}={}", m.get_ref(), r.get_ref()))
                        .collect();
                    if let StepKind::Transfer {
                        from: f,
                        to,
                        datastore,
                    } = &s.kind
                    {
                        from.push(format!(
                            "{} → {}:{}",
                            f.get_ref(),
                            datastore.get_ref(),
                            to.get_ref()
                        ));
                    }
                    from.extend(s.after.iter().map(|a| format!("after {}", a.get_ref())));
                    let outputs: Vec<&str> =
                        s.outputs.iter().map(|o| o.get_ref().as_str()).collect();
                    let _ = write!(
                        out,
                        "  {:width$}  {:8}",
                        s.name.get_ref(),
                        s.kind.runtime_name()
                    );
                    if !from.is_empty() {
                        let _ = write!(out, "  ← {}", from.join(", "));
                    }
                    if !outputs.is_empty() {
                        let _ = write!(out, "  → {}", outputs.join(", "));
                    }
                    out.push('\n');
                }
            }
            GraphFormat::Dot => {
                let _ = writeln!(
                    out,
                    "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];",
                    p.name.get_ref()
                );
                for inp in &p.inputs {
                    let _ = writeln!(
                        out,
                        "  \"inputs.{0}\" [shape=cylinder, label=\"{0}\"];",
                        inp.name.get_ref()
                    );
                }
                for &i in &self.order {
                    let s = &p.steps[i];
                    let _ = writeln!(
                        out,
                        "  \"{0}\" [label=\"{0}\\n({1})\"];",
                        s.name.get_ref(),
                        s.kind.runtime_name()
                    );
                }
                for (name, i) in input_edges() {
                    let _ = writeln!(
                        out,
                        "  \"inputs.{name}\" -> \"{}\";",
                        p.steps[i].name.get_ref()
                    );
                }
                for (d, i, label) in edges() {
                    let _ = writeln!(
                        out,
                        "  \"{}\" -> \"{}\" [label=\"{label}\"];",
                        p.steps[d].name.get_ref(),
                        p.steps[i].name.get_ref()
                    );
                }
                out.push_str("}\n");
            }
            GraphFormat::Mermaid => {
                out.push_str("flowchart LR\n");
                let id = |s: &str| s.replace('-', "_");
                for inp in &p.inputs {
                    let _ = writeln!(
                        out,
                        "  in_{}[(\"{}\")]",
                        id(inp.name.get_ref()),
                        inp.name.get_ref()
                    );
                }
                for &i in &self.order {
                    let s = &p.steps[i];
                    let _ = writeln!(
                        out,
                        "  {}[\"{} ({})\"]",
                        id(s.name.get_ref()),
                        s.name.get_ref(),
                        s.kind.runtime_name()
                    );
                }
                for (name, i) in input_edges() {
                    let _ = writeln!(
                        out,
                        "  in_{} --> {}",
                        id(&name),
                        id(p.steps[i].name.get_ref())
                    );
                }
                for (d, i, label) in edges() {
                    let arrow = if label.is_empty() {
                        "-->".to_string()
                    } else {
                        format!("-->|{label}|")
                    };
                    let _ = writeln!(
                        out,
                        "  {} {arrow} {}",
                        id(p.steps[d].name.get_ref()),
                        id(p.steps[i].name.get_ref())
                    );
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    Text,
    Dot,
    Mermaid,
}
