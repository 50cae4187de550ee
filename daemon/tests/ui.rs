//! Golden configuration errors: each `tests/ui/NAME.toml` is validated and its
//! stderr must equal `tests/ui/NAME.err` (exit code 78). `MILLRACE_BLESS=1`
//! rewrites the `.err` files after a deliberate change of wording.

use std::path::Path;
use std::process::Command;

#[test]
fn every_mistake_is_reported_at_its_line_and_column() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cases: Vec<_> = std::fs::read_dir(root.join("tests/ui"))
        .expect("tests/ui")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 15, "only {} golden cases", cases.len());
    let bless = std::env::var_os("MILLRACE_BLESS").is_some();
    let mut failures = Vec::new();
    for case in &cases {
        let rel = case.strip_prefix(root).expect("below the crate");
        let out = Command::new(env!("CARGO_BIN_EXE_millrace"))
            .current_dir(root)
            .args(["validate"])
            // No registry: a module spec resolves against an empty one.
            .env("MILLRACE_STATE", root.join("tests/ui/no-such-state"))
            .arg(rel)
            .output()
            .expect("run millrace");
        let got = String::from_utf8_lossy(&out.stderr).into_owned();
        let expected_path = case.with_extension("err");
        if bless {
            std::fs::write(&expected_path, &got).expect("bless");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if out.status.code() != Some(78) {
            failures.push(format!(
                "{}: exit code {:?}, expected 78",
                rel.display(),
                out.status.code()
            ));
        }
        if got != expected {
            failures.push(format!(
                "{}:\n--- expected\n{expected}\n--- got\n{got}",
                rel.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
