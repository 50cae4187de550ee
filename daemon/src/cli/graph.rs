//! `millrace graph`: a pipeline's DAG ([`crate::graph::Graph`]) drawn as text,
//! Graphviz dot or Mermaid. Presentation only: the graph itself is the library's.

use std::fmt::Write;

use crate::definition::{Pipeline, Reference, StepKind};
use crate::graph::Graph;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    Text,
    Dot,
    Mermaid,
}

pub fn render(g: &Graph, p: &Pipeline, format: GraphFormat) -> String {
    match format {
        GraphFormat::Text => text(g, p),
        GraphFormat::Dot => dot(g, p),
        GraphFormat::Mermaid => mermaid(g, p),
    }
}

/// Step → step edges in topological order: (from, to, the outputs of `from`
/// that `to` reads; none for an `after` edge).
fn edges(g: &Graph, p: &Pipeline) -> Vec<(usize, usize, Vec<String>)> {
    let mut out = Vec::new();
    for &i in &g.order {
        let s = &p.steps[i];
        for &d in &g.deps[i] {
            let label: Vec<String> = s
                .references()
                .filter_map(|(_, r)| match r.get_ref() {
                    Reference::Output { step, output } if step == p.steps[d].name.get_ref() => {
                        Some(output.clone())
                    }
                    _ => None,
                })
                .collect();
            out.push((d, i, label));
        }
    }
    out
}

/// Dataset → step edges: (`[inputs.NAME]`, the step reading it).
fn input_edges(g: &Graph, p: &Pipeline) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for &i in &g.order {
        for (_, r) in p.steps[i].references() {
            if let Reference::Input(name) = r.get_ref() {
                out.push((name.clone(), i));
            }
        }
    }
    out
}

/// One line per step in run order: runtime, what it reads, what it writes.
fn text(g: &Graph, p: &Pipeline) -> String {
    let mut out = String::new();
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
    for &i in &g.order {
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
            mode,
        } = &s.kind
        {
            // A merge says so; a replace (the default) prints as it always has.
            let merge = match mode {
                crate::definition::TransferMode::Merge => " (merge)",
                crate::definition::TransferMode::Replace => "",
            };
            from.push(format!(
                "{} → {}:{}{merge}",
                f.get_ref(),
                datastore.get_ref(),
                to.get_ref()
            ));
        }
        from.extend(s.after.iter().map(|a| format!("after {}", a.get_ref())));
        let outputs: Vec<&str> = s.outputs.iter().map(|o| o.get_ref().as_str()).collect();
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
    out
}

fn dot(g: &Graph, p: &Pipeline) -> String {
    let mut out = String::new();
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
    for &i in &g.order {
        let s = &p.steps[i];
        let _ = writeln!(
            out,
            "  \"{0}\" [label=\"{0}\\n({1})\"];",
            s.name.get_ref(),
            s.kind.runtime_name()
        );
    }
    for (name, i) in input_edges(g, p) {
        let _ = writeln!(
            out,
            "  \"inputs.{name}\" -> \"{}\";",
            p.steps[i].name.get_ref()
        );
    }
    for (d, i, label) in edges(g, p) {
        let label = label.join(", ");
        let _ = writeln!(
            out,
            "  \"{}\" -> \"{}\" [label=\"{label}\"];",
            p.steps[d].name.get_ref(),
            p.steps[i].name.get_ref()
        );
    }
    out.push_str("}\n");
    out
}

fn mermaid(g: &Graph, p: &Pipeline) -> String {
    let mut out = String::from("flowchart LR\n");
    let id = |s: &str| s.replace('-', "_");
    for inp in &p.inputs {
        let _ = writeln!(
            out,
            "  in_{}[(\"{}\")]",
            id(inp.name.get_ref()),
            inp.name.get_ref()
        );
    }
    for &i in &g.order {
        let s = &p.steps[i];
        let _ = writeln!(
            out,
            "  {}[\"{} ({})\"]",
            id(s.name.get_ref()),
            s.name.get_ref(),
            s.kind.runtime_name()
        );
    }
    for (name, i) in input_edges(g, p) {
        let _ = writeln!(
            out,
            "  in_{} --> {}",
            id(&name),
            id(p.steps[i].name.get_ref())
        );
    }
    for (d, i, label) in edges(g, p) {
        let arrow = if label.is_empty() {
            "-->".to_string()
        } else {
            format!("-->|{}|", label.join(", "))
        };
        let _ = writeln!(
            out,
            "  {} {arrow} {}",
            id(p.steps[d].name.get_ref()),
            id(p.steps[i].name.get_ref())
        );
    }
    out
}

/// `graph --json`: the nodes (`kind` `input`, a `[inputs.NAME]` dataset with its
/// path, or `step`, with its runtime and outputs, in run order) and the edges
/// (`kind` `input` from a dataset, `data` from a step whose `outputs` the other
/// reads, `after` for an ordering-only edge).
pub fn json(g: &Graph, p: &Pipeline) -> serde_json::Value {
    use serde_json::json;
    let mut nodes: Vec<serde_json::Value> = p
        .inputs
        .iter()
        .map(|i| {
            json!({"id": format!("inputs.{}", i.name.get_ref()), "kind": "input",
                   "name": i.name.get_ref(), "datastore": i.datastore.get_ref(),
                   "path": i.path.get_ref()})
        })
        .collect();
    nodes.extend(g.order.iter().map(|&i| {
        let s = &p.steps[i];
        let outputs: Vec<&String> = s.outputs.iter().map(|o| o.get_ref()).collect();
        json!({"id": s.name.get_ref(), "kind": "step", "name": s.name.get_ref(),
               "runtime": s.kind.runtime_name(), "outputs": outputs})
    }));
    let mut edges_out: Vec<serde_json::Value> = input_edges(g, p)
        .into_iter()
        .map(|(name, i)| {
            json!({"from": format!("inputs.{name}"), "to": p.steps[i].name.get_ref(), "kind": "input"})
        })
        .collect();
    edges_out.extend(edges(g, p).into_iter().map(|(d, i, outputs)| {
        let kind = if outputs.is_empty() { "after" } else { "data" };
        json!({"from": p.steps[d].name.get_ref(), "to": p.steps[i].name.get_ref(),
               "kind": kind, "outputs": outputs})
    }));
    json!({"pipeline": p.name.get_ref(), "nodes": nodes, "edges": edges_out})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_drawings_show_the_same_edges() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s.wasm"), b"\0asm").unwrap();
        std::fs::write(dir.path().join("d.csv"), b"x\n").unwrap();
        let text = "[inputs.data]\npath = \"d.csv\"\n\
            [[step]]\nname = \"clean-up\"\nwasm = \"s.wasm\"\ninputs = { x = \"inputs.data\" }\noutputs = [\"out\"]\n\
            [[step]]\nname = \"train\"\nwasm = \"s.wasm\"\ninputs = { x = \"clean-up.out\" }\n\
            [[step]]\nname = \"report\"\nwasm = \"s.wasm\"\nafter = [\"train\"]\n";
        let (p, report) =
            crate::graph::parse(&dir.path().join("p.toml"), text.into(), &Default::default());
        let p = p.unwrap_or_else(|| panic!("{report}"));
        let g = Graph::new(&p);
        let text = render(&g, &p, GraphFormat::Text);
        assert!(text.starts_with("pipeline p (3 steps)\n"), "{text}");
        assert!(
            text.contains("train     wasm      ← x=clean-up.out"),
            "{text}"
        );
        assert!(text.contains("report    wasm      ← after train"), "{text}");
        let dot = render(&g, &p, GraphFormat::Dot);
        assert!(dot.contains("\"inputs.data\" -> \"clean-up\";"), "{dot}");
        assert!(
            dot.contains("\"clean-up\" -> \"train\" [label=\"out\"];"),
            "{dot}"
        );
        assert!(
            dot.contains("\"train\" -> \"report\" [label=\"\"];"),
            "{dot}"
        );
        let mermaid = render(&g, &p, GraphFormat::Mermaid);
        assert!(mermaid.contains("in_data --> clean_up"), "{mermaid}");
        assert!(mermaid.contains("clean_up -->|out| train"), "{mermaid}");
        assert!(mermaid.contains("train --> report"), "{mermaid}");
        let v = json(&g, &p);
        assert_eq!(v["pipeline"], "p");
        let kinds: Vec<(&str, &str)> = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["id"].as_str().unwrap(), n["kind"].as_str().unwrap()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("inputs.data", "input"),
                ("clean-up", "step"),
                ("train", "step"),
                ("report", "step")
            ]
        );
        assert_eq!(
            v["edges"],
            serde_json::json!([
                {"from": "inputs.data", "to": "clean-up", "kind": "input"},
                {"from": "clean-up", "to": "train", "kind": "data", "outputs": ["out"]},
                {"from": "train", "to": "report", "kind": "after", "outputs": []},
            ])
        );
    }
}
