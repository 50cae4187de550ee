//! The execution graph: steps connected by their data references (`step.output`) and
//! `after` edges. [`check`] reports every bad reference and names each cycle;
//! [`Graph`] is the validated DAG the planner and the run walk. [`load`] and
//! [`parse`] read a pipeline file completely: the walk of
//! [`crate::definition`], then these checks.

use std::collections::HashMap;
use std::path::Path;

use crate::definition::{Environment, Pipeline, Reference, Sp};
use crate::diagnostic::{Diagnostic, Report, SourceFile, closest};

/// Reads and checks a pipeline file. The [`Report`] carries every diagnostic; the
/// pipeline is `Some` only when there is no error.
/// A file that is not UTF-8 is reported at its first invalid byte.
pub fn load(path: &Path, env: &Environment) -> Result<(Option<Pipeline>, Report), std::io::Error> {
    let bytes = std::fs::read(path)?;
    let path = std::path::absolute(path)?;
    Ok(parse_bytes(&path, bytes, env))
}

/// Checks a pipeline file's bytes: [`parse`] once they are UTF-8 text.
pub fn parse_bytes(path: &Path, bytes: Vec<u8>, env: &Environment) -> (Option<Pipeline>, Report) {
    match SourceFile::decode(path, bytes) {
        Ok(source) => parse(path, source.text, env),
        Err(report) => (None, report),
    }
}

/// Checks a pipeline file's text: its keys and values, then its references and
/// cycles. `path` names the file in diagnostics and anchors relative paths.
pub fn parse(path: &Path, text: String, env: &Environment) -> (Option<Pipeline>, Report) {
    let (pipeline, source, mut diagnostics) = crate::definition::walk(path, text, env);
    if let Some(p) = &pipeline {
        check(p, &mut diagnostics);
    }
    let report = Report::new(source, diagnostics);
    let pipeline = if report.has_errors() { None } else { pipeline };
    (pipeline, report)
}

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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A graph from `deps[i]`, the steps step `i` waits for.
    fn graph(deps: &[&[usize]]) -> Graph {
        let deps: Vec<Vec<usize>> = deps.iter().map(|d| d.to_vec()).collect();
        let mut dependants = vec![Vec::new(); deps.len()];
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

    /// `steps` parsed beside a (fake) `s.wasm`, which parsing only looks for.
    fn parse_steps(steps: &str) -> (Option<Pipeline>, Report) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s.wasm"), b"\0asm").unwrap();
        let text = format!("name = \"p\"\n[inputs.a]\npath = \"a.txt\"\n{steps}");
        parse(&dir.path().join("p.toml"), text, &Environment::default())
    }

    fn step(name: &str, inputs: &str, after: &str) -> String {
        format!(
            "[[step]]\nname = \"{name}\"\nwasm = \"s.wasm\"\ninputs = {{ {inputs} }}\noutputs = [\"out\"]\nafter = [{after}]\n"
        )
    }

    fn errors(report: &Report) -> Vec<String> {
        report
            .diagnostics
            .iter()
            .filter(|d| d.severity == crate::diagnostic::Severity::Error)
            .map(|d| d.message.clone())
            .collect()
    }

    #[test]
    fn the_order_puts_every_step_after_its_dependencies_and_keeps_file_order_otherwise() {
        // 3 waits for 0 and 1, 1 waits for 2.
        let g = graph(&[&[], &[2], &[], &[0, 1]]);
        assert_eq!(g.topological_order(), [0, 2, 1, 3]);
        let g = graph(&[&[], &[], &[], &[]]);
        assert_eq!(g.topological_order(), [0, 1, 2, 3]);
        // A chain written backwards runs forwards.
        let g = graph(&[&[1], &[2], &[3], &[]]);
        assert_eq!(g.topological_order(), [3, 2, 1, 0]);
    }

    #[test]
    fn steps_on_a_cycle_are_left_out_of_the_order() {
        let g = graph(&[&[1], &[0], &[], &[0]]);
        assert_eq!(g.topological_order(), [2]);
    }

    #[test]
    fn each_cycle_is_found_once_dependency_first() {
        // 0 -> 1 -> 2 -> 0 (0 waits for 1, …) and, apart, 3 <-> 4; 5 waits for both.
        let g = graph(&[&[1], &[2], &[0], &[4], &[3], &[0, 3]]);
        assert_eq!(g.cycles(), [vec![2, 1, 0], vec![4, 3]]);
        let diamond = graph(&[&[], &[0], &[0], &[1, 2]]);
        assert!(diamond.cycles().is_empty());
    }

    #[test]
    fn a_parsed_pipeline_orders_by_data_and_after_edges_without_duplicates() {
        let (p, report) = parse_steps(
            &[
                step("last", "x = \"mid.out\", y = \"mid.out\"", "\"first\""),
                step("mid", "x = \"first.out\"", ""),
                step("first", "x = \"inputs.a\"", ""),
                step("alone", "x = \"inputs.a\"", ""),
            ]
            .concat(),
        );
        let p = p.unwrap_or_else(|| panic!("{report}"));
        let g = Graph::new(&p);
        assert_eq!(g.deps, [vec![1, 2], vec![2], vec![], vec![]]);
        assert_eq!(g.dependants, [vec![], vec![0], vec![0, 1], vec![]]);
        // Of the steps ready at once, the one first in the file goes first.
        assert_eq!(g.order, [2, 1, 0, 3]);
    }

    #[test]
    fn a_cycle_through_data_and_after_is_an_error_naming_it() {
        let (p, report) = parse_steps(
            &[
                step("a", "x = \"c.out\"", ""),
                step("b", "x = \"a.out\"", ""),
                step("c", "x = \"inputs.a\"", "\"b\""),
                step("ok", "x = \"inputs.a\"", ""),
            ]
            .concat(),
        );
        assert!(p.is_none());
        assert_eq!(
            errors(&report),
            ["cycle in the step graph: [ b -> c -> a -> b ]"]
        );
    }

    #[test]
    fn a_step_after_itself_is_a_cycle() {
        let (p, report) = parse_steps(&step("a", "x = \"inputs.a\"", "\"a\""));
        assert!(p.is_none());
        assert_eq!(errors(&report).len(), 1, "{report}");
    }
}
