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
/// that `to` reads; empty for an `after` edge).
fn edges(g: &Graph, p: &Pipeline) -> Vec<(usize, usize, String)> {
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
            out.push((d, i, label.join(", ")));
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
            format!("-->|{label}|")
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
    }
}
