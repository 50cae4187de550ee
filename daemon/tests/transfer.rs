//! Transfers that merge into their destination (`mode = "merge"`): what they
//! keep, add and replace, when they are reused, and that a link at the
//! destination never leads them outside it. (Replace mode: `run.rs`.)

use crate::common::{Project, plugin, step_error};
use crate::run::{run_as_planned, summary};

/// `make` copies the files of `batch/` into its output; `publish` merges that
/// output into `outbox/`.
fn merge_pipeline(p: &Project, mode: &str) -> String {
    p.write("batch/a.csv", "a,1\n");
    let f = p.write(
        "publish.toml",
        &format!(
            r#"
[inputs.batch]
path = "batch"
[[step]]
name = "make"
wasm = "{}"
inputs = {{ x = "inputs.batch" }}
outputs = ["out"]
[[step]]
name = "publish"
transfer = {{ from = "make.out", to = "outbox"{mode} }}
"#,
            plugin("copy")
        ),
    );
    f.to_str().unwrap().to_string()
}

fn read(p: &Project, rel: &str) -> String {
    std::fs::read_to_string(p.path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The files under `dir`, relative, sorted.
fn files(p: &Project, dir: &str) -> Vec<String> {
    let root = p.path(dir);
    let mut out: Vec<String> = walkdir::WalkDir::new(&root)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| !e.file_type().is_dir())
        .map(|e| e.path().strip_prefix(&root).unwrap().display().to_string())
        .collect();
    out.sort();
    out
}

#[test]
fn a_merge_keeps_earlier_files_adds_new_ones_and_replaces_changed_ones() {
    let p = Project::new();
    let f = merge_pipeline(&p, r#", mode = "merge""#);
    let s = summary(&p, &[&f]);
    assert_eq!(s["executed"].as_u64(), Some(2), "{s}");
    assert_eq!(files(&p, "outbox"), ["a.csv"]);
    // Someone else's file in the destination, and a batch that no longer holds
    // a.csv but holds two new files, one in a directory.
    p.write("outbox/notes.txt", "mine\n");
    std::fs::remove_file(p.path("batch/a.csv")).unwrap();
    p.write("batch/b.csv", "b,1\n");
    p.write("batch/sub/c.csv", "c,1\n");
    let s = summary(&p, &[&f]);
    assert_eq!(s["executed"].as_u64(), Some(2), "{s}");
    assert_eq!(
        files(&p, "outbox"),
        ["a.csv", "b.csv", "notes.txt", "sub/c.csv"],
        "earlier files stay, new ones are added"
    );
    assert_eq!(read(&p, "outbox/a.csv"), "a,1\n");
    assert_eq!(read(&p, "outbox/notes.txt"), "mine\n");
    // A changed file is replaced (by a new file: a hard link to the old one
    // elsewhere keeps the old content); the others are not rewritten.
    let linked = p.path("old-b.csv");
    std::fs::hard_link(p.path("outbox/b.csv"), &linked).unwrap();
    let c_before = std::fs::metadata(p.path("outbox/sub/c.csv")).unwrap();
    p.write("batch/b.csv", "b,2\n");
    let s = summary(&p, &[&f]);
    assert_eq!(s["executed"].as_u64(), Some(2), "{s}");
    assert_eq!(read(&p, "outbox/b.csv"), "b,2\n");
    assert_eq!(std::fs::read_to_string(&linked).unwrap(), "b,1\n");
    let c_after = std::fs::metadata(p.path("outbox/sub/c.csv")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (c_before.ino(), c_before.mtime_nsec()),
        (c_after.ino(), c_after.mtime_nsec()),
        "an unchanged file is left as it is"
    );
    assert_eq!(
        files(&p, "outbox"),
        ["a.csv", "b.csv", "notes.txt", "sub/c.csv"]
    );
    // No staging copy is left behind.
    assert!(std::fs::read_dir(p.path("outbox")).unwrap().all(|e| {
        !e.unwrap()
            .file_name()
            .to_string_lossy()
            .contains("millrace")
    }),);
}

#[test]
fn plan_and_run_agree_on_a_merge_whose_files_changed_at_the_destination() {
    let p = Project::new();
    let f = merge_pipeline(&p, r#", mode = "merge""#);
    p.write("batch/b.csv", "b,1\n");
    run_as_planned(&p, &f);
    // Files the merge did not write do not matter to it.
    p.write("outbox/notes.txt", "mine\n");
    let unchanged = run_as_planned(&p, &f);
    assert_eq!(
        (unchanged[0].1.as_str(), unchanged[1].1.as_str()),
        ("reuse", "reuse"),
        "{unchanged:?}"
    );

    // One file it wrote is deleted: the merge executes again and puts it back.
    std::fs::remove_file(p.path("outbox/b.csv")).unwrap();
    let deleted = run_as_planned(&p, &f);
    assert_eq!(deleted[0].1, "reuse", "{deleted:?}");
    let (_, decision, reason) = &deleted[1];
    assert_eq!(decision, "run", "{deleted:?}");
    assert!(
        reason.contains("outbox no longer holds what it published"),
        "{reason}"
    );
    assert_eq!(read(&p, "outbox/b.csv"), "b,1\n");
    assert_eq!(read(&p, "outbox/notes.txt"), "mine\n");

    // Altered, even keeping its size: the same.
    std::fs::write(p.path("outbox/a.csv"), "a,9\n").unwrap();
    let altered = run_as_planned(&p, &f);
    assert_eq!(altered[1].1, "run", "{altered:?}");
    assert_eq!(read(&p, "outbox/a.csv"), "a,1\n");

    // Intact again: reused, and the text plan says so.
    let again = run_as_planned(&p, &f);
    assert_eq!(again[1].1, "reuse", "{again:?}");
}

#[test]
fn a_replace_and_a_merge_to_the_same_place_are_different_keys() {
    let p = Project::new();
    let f = merge_pipeline(&p, "");
    assert_eq!(summary(&p, &[&f])["executed"].as_u64(), Some(2));
    let text = read(&p, "publish.toml")
        .replace(r#"to = "outbox" }"#, r#"to = "outbox", mode = "merge" }"#);
    p.write("publish.toml", &text);
    let plan = run_as_planned(&p, &f);
    assert_eq!(plan[0].1, "reuse", "{plan:?}");
    assert_eq!(plan[1].1, "run", "{plan:?}");
    assert!(plan[1].2.contains("code changed"), "{plan:?}");
    // And back: the replace's earlier execution is reused while the
    // destination is exactly its artifact.
    let text = text.replace(r#", mode = "merge""#, r#", mode = "replace""#);
    p.write("publish.toml", &text);
    let plan = run_as_planned(&p, &f);
    assert_eq!(plan[1].1, "reuse", "{plan:?}");
}

#[test]
fn a_merge_never_writes_through_a_link_at_its_destination() {
    let p = Project::new();
    let f = merge_pipeline(&p, r#", mode = "merge""#);
    p.write("batch/sub/c.csv", "c,1\n");
    p.write("outside/secret.txt", "secret\n");
    std::fs::create_dir_all(p.path("outbox")).unwrap();
    // A link where the artifact has a file: replaced by the file, its target
    // untouched.
    std::os::unix::fs::symlink(p.path("outside/secret.txt"), p.path("outbox/a.csv")).unwrap();
    let s = summary(&p, &[&f]);
    assert_eq!(s["executed"].as_u64(), Some(2), "{s}");
    assert!(!p.path("outbox/a.csv").is_symlink());
    assert_eq!(read(&p, "outbox/a.csv"), "a,1\n");
    assert_eq!(read(&p, "outside/secret.txt"), "secret\n");

    // A link where the artifact has a directory: the transfer fails, naming
    // it, and writes nothing through it.
    std::fs::remove_dir_all(p.path("outbox/sub")).unwrap();
    std::os::unix::fs::symlink(p.path("outside"), p.path("outbox/sub")).unwrap();
    p.write("batch/sub/c.csv", "c,2\n");
    let out = p.run(&["run", &f]);
    assert!(!out.status.success());
    let e = step_error(&p, "publish");
    assert!(
        e.contains("outbox/sub")
            && e.contains("a symbolic link is where the artifact has a directory"),
        "{e}"
    );
    assert_eq!(files(&p, "outside"), ["secret.txt"]);

    // The destination itself a link: refused as well.
    std::fs::remove_dir_all(p.path("outbox")).unwrap();
    std::os::unix::fs::symlink(p.path("outside"), p.path("outbox")).unwrap();
    let out = p.run(&["run", &f]);
    assert!(!out.status.success());
    let e = step_error(&p, "publish");
    assert!(e.contains("a symbolic link"), "{e}");
    assert_eq!(files(&p, "outside"), ["secret.txt"]);
}
