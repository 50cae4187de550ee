//! The module registry: publish, resolve, status changes, default moves, lineage,
//! export/import, concurrent publishes.

use crate::common::{Project, plugin, stderr};

fn publish(p: &Project, wasm: &str, version: &str) -> std::process::Output {
    p.run(&[
        "module",
        "publish",
        &plugin(wasm),
        "--name",
        "tool",
        "--version",
        version,
    ])
}

/// `tool@1.0.0` = copy, `tool@1.1.0` = copy too (another build would differ;
/// here the same bytes under two versions), `tool@2.0.0` = noop.
fn registry(p: &Project) {
    for (wasm, v) in [("copy", "1.0.0"), ("env", "1.1.0"), ("noop", "2.0.0")] {
        let out = publish(p, wasm, v);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

fn pipeline(p: &Project, spec_a: &str, spec_b: &str) -> String {
    p.write("data/x.txt", "payload\n");
    p.write(
        "mods.toml",
        &format!(
            r#"
[inputs.x]
path = "data/x.txt"

[[step]]
name = "a"
module = "{spec_a}"
inputs = {{ x = "inputs.x" }}
outputs = ["out"]

[[step]]
name = "b"
module = "{spec_b}"
inputs = {{ x = "inputs.x" }}
outputs = ["out"]
"#
        ),
    );
    p.path("mods.toml").display().to_string()
}

fn step_modules(p: &Project) -> Vec<(String, String, String)> {
    let v = p.json(&["runs", "show", "latest"]);
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
                s["module"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn publishing_is_immutable_and_each_spec_form_resolves() {
    let p = Project::new();
    registry(&p);
    let again = publish(&p, "copy", "1.0.0");
    assert!(again.status.success(), "same content: a no-op");
    assert!(String::from_utf8_lossy(&again.stdout).contains("already published with this content"));
    let other = publish(&p, "noop", "1.0.0");
    assert_eq!(other.status.code(), Some(2));
    let err = stderr(&other);
    let list = p.json(&["module", "list", "tool"]);
    let copy_digest = list[0]["digest"].as_str().unwrap();
    let noop_digest = list[2]["digest"].as_str().unwrap();
    assert!(
        err.contains(copy_digest) && err.contains(noop_digest),
        "{err}"
    );
    let bad = p.run(&[
        "module",
        "publish",
        &plugin("copy"),
        "--name",
        "tool",
        "--version",
        "1.0",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("not a semver version"),
        "{}",
        stderr(&bad)
    );

    for (spec, want) in [
        ("tool", "tool@2.0.0"),
        ("tool@1.0.0", "tool@1.0.0"),
        ("tool@^1.0", "tool@1.1.0"),
        ("tool@~1.0", "tool@1.0.0"),
        ("tool@>=1, <2", "tool@1.1.0"),
    ] {
        let f = pipeline(&p, spec, "tool@2.0.0");
        let out = p.run(&["run", &f]);
        assert!(out.status.success(), "{spec}: {}", stderr(&out));
        assert_eq!(step_modules(&p)[0].2, want, "{spec}");
    }
    let f = pipeline(&p, "tool@^3", "tool");
    let out = p.run(&["validate", &f]);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(
        err.contains("mods.toml:7:10: error: step `a`: no usable version of `tool` matches `^3`"),
        "{err}"
    );
    assert!(
        err.contains("versions of `tool`: 1.0.0, 1.1.0, 2.0.0"),
        "{err}"
    );
    let f = pipeline(&p, "tol", "tool");
    let err = stderr(&p.run(&["validate", &f]));
    assert!(
        err.contains("unknown module `tol`") && err.contains("did you mean `tool`?"),
        "{err}"
    );
}

#[test]
fn deprecated_warns_disabled_refuses_with_the_location() {
    let p = Project::new();
    registry(&p);
    let f = pipeline(&p, "tool@1.0.0", "tool@^1.0");
    p.write("pipelines/.keep", "");
    std::fs::copy(&f, p.path("pipelines/mods.toml")).unwrap();
    let dep = p.run(&[
        "module",
        "deprecate",
        "tool@1.0.0",
        "--message",
        "use 1.1",
        "--pipelines",
        "pipelines",
    ]);
    assert!(dep.status.success(), "{}", stderr(&dep));
    let listed = String::from_utf8_lossy(&dep.stdout);
    assert!(
        listed.contains("mods (step a"),
        "impact analysis first: {listed}"
    );
    let out = p.run(&["validate", &f]);
    assert!(out.status.success());
    assert_eq!(
        stderr(&out).replace(&p.path("").display().to_string(), ""),
        "mods.toml:7:10: warning: step `a`: module `tool@1.0.0` is deprecated: use 1.1\n   7 | module = \"tool@1.0.0\"\n     |          ^^^^^^^^^^^^\n     = help: it still runs; pin another version of `tool` to silence this\n"
    );
    let run = p.run(&["run", &f]);
    assert!(run.status.success());
    assert!(stderr(&run).contains("is deprecated"), "run output warns");
    let show = p.json(&["runs", "show", "latest"]);
    assert_eq!(
        show["warnings"][0], "step `a`: module `tool@1.0.0` is deprecated: use 1.1",
        "the run record keeps the warning"
    );

    let refused = p.run(&[
        "module",
        "disable",
        "tool@1.0.0",
        "--pipelines",
        "pipelines",
    ]);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "pipelines still use it: --force needed"
    );
    assert!(stderr(&refused).contains("--force"));
    let forced = p.run(&[
        "module",
        "disable",
        "tool@1.0.0",
        "--force",
        "--pipelines",
        "pipelines",
    ]);
    assert!(forced.status.success());
    let out = p.run(&["validate", &f]);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out).replace(&p.path("").display().to_string(), "");
    assert!(
        err.starts_with("mods.toml:7:10: error: step `a`: module `tool@1.0.0` is disabled\n   7 | module = \"tool@1.0.0\"\n     |          ^^^^^^^^^^^^\n     = help: versions of `tool`: 1.0.0 (disabled), 1.1.0, 2.0.0; pin another version, or `millrace module enable tool@1.0.0`\n"),
        "{err}"
    );
    // `^1.0` skips the disabled version.
    let f2 = pipeline(&p, "tool@^1.0", "tool@^1.0");
    assert!(p.run(&["validate", &f2]).status.success());
    assert!(p.run(&["module", "enable", "tool@1.0.0"]).status.success());
    let show = p.json(&["module", "show", "tool@1.0.0", "--pipelines", "pipelines"]);
    let events: Vec<&str> = show["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["published", "deprecated", "disabled", "enabled"]);
    assert_eq!(show["pipelines"][0]["pipeline"], "mods");
    assert!(
        !show["runs"].as_array().unwrap().is_empty(),
        "last runs that used it"
    );
}

#[test]
fn moving_the_default_reruns_exactly_the_steps_that_use_it() {
    let p = Project::new();
    registry(&p);
    let f = pipeline(&p, "tool", "tool@1.0.0");
    assert!(
        p.run(&["module", "default", "tool", "1.0.0"])
            .status
            .success()
    );
    assert!(p.run(&["run", &f]).status.success());
    assert!(p.run(&["run", &f]).status.success());
    let s = step_modules(&p);
    assert_eq!(s[0].1, "reused");
    assert_eq!(s[1].1, "reused");
    // Republishing the same content changes nothing.
    assert!(publish(&p, "copy", "1.0.0").status.success());
    assert!(p.run(&["run", &f]).status.success());
    assert!(step_modules(&p).iter().all(|s| s.1 == "reused"));
    assert!(
        p.run(&["module", "default", "tool", "1.1.0"])
            .status
            .success()
    );
    let plan = p.json(&["plan", &f]);
    assert!(
        plan.to_string().contains("code"),
        "plan names the code change: {plan}"
    );
    assert!(p.run(&["run", &f]).status.success());
    let s = step_modules(&p);
    assert_eq!(
        (s[0].1.as_str(), s[0].2.as_str()),
        ("succeeded", "tool@1.1.0")
    );
    assert_eq!((s[1].1.as_str(), s[1].2.as_str()), ("reused", "tool@1.0.0"));
    let explain = p.run(&["explain", "latest", "a"]);
    assert!(
        String::from_utf8_lossy(&explain.stdout).contains("code"),
        "{}",
        String::from_utf8_lossy(&explain.stdout)
    );
    // Lineage names the module version that produced an output.
    let lineage = p.run(&["lineage", "latest:a.out"]);
    assert!(
        String::from_utf8_lossy(&lineage.stdout).contains("by module tool@1.1.0"),
        "{}",
        String::from_utf8_lossy(&lineage.stdout)
    );
}

#[test]
fn export_import_round_trips_and_a_tampered_archive_is_rejected() {
    let a = Project::new();
    registry(&a);
    let archive = a.path("tool.mod");
    let out = a.run(&[
        "module",
        "export",
        "tool@1.0.0",
        "-o",
        archive.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let b = Project::new();
    let out = b.run(&["module", "import", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = b.json(&["module", "show", "tool@1.0.0"]);
    let want = a.json(&["module", "show", "tool@1.0.0"]);
    assert_eq!(got["digest"], want["digest"]);
    let f = pipeline(&b, "tool@1.0.0", "tool@1.0.0");
    assert!(
        b.run(&["run", &f]).status.success(),
        "the imported module runs"
    );

    // Flip one byte of the code inside the archive.
    let mut bytes = std::fs::read(&archive).unwrap();
    let at = bytes.windows(4).position(|w| w == b"\0asm").unwrap() + 100;
    bytes[at] ^= 0xff;
    let bad = a.path("tampered.mod");
    std::fs::write(&bad, &bytes).unwrap();
    let c = Project::new();
    let out = c.run(&["module", "import", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("does not match its digest"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        c.json(&["module", "list"]),
        serde_json::json!([]),
        "nothing imported"
    );
}

#[test]
fn concurrent_publishes_of_one_version_leave_one_record() {
    let p = Project::new();
    assert!(
        publish(&p, "noop", "0.1.0").status.success(),
        "the database exists"
    );
    for round in 0..3 {
        let version = format!("1.{round}.0");
        let children: Vec<_> = [("copy", 0), ("env", 1)]
            .iter()
            .map(|(wasm, _)| {
                p.cmd(&[
                    "module",
                    "publish",
                    &plugin(wasm),
                    "--name",
                    "race",
                    "--version",
                    &version,
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
            })
            .collect();
        let outs: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        let ok = outs.iter().filter(|o| o.status.success()).count();
        assert_eq!(
            ok,
            1,
            "one wins, the other is told: {:?}",
            outs.iter().map(stderr).collect::<Vec<_>>()
        );
        let loser = outs.iter().find(|o| !o.status.success()).unwrap();
        assert!(
            stderr(loser).contains("already published with other content"),
            "{}",
            stderr(loser)
        );
        let list = p.json(&["module", "list", "race"]);
        let versions: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["version"] == version.as_str())
            .map(|m| m["digest"].as_str().unwrap())
            .collect();
        assert_eq!(versions.len(), 1);
        let show = p.json(&["module", "show", &format!("race@{version}")]);
        assert_eq!(
            show["history"].as_array().unwrap().len(),
            1,
            "one `published` event"
        );
    }
}

#[test]
fn registry_guards_refuse_what_would_break_immutability_or_pipelines() {
    let p = Project::new();
    registry(&p);
    let meta = publish(&p, "noop", "1.0.0+build7");
    assert_eq!(meta.status.code(), Some(2));
    assert!(
        stderr(&meta).contains("without build metadata"),
        "{}",
        stderr(&meta)
    );
    p.write("code/a.py", "print('a')\n");
    p.write("outside.py", "print('x')\n");
    let escape = p.run(&[
        "module",
        "publish",
        p.path("code").to_str().unwrap(),
        "--entry",
        "../outside.py",
        "--name",
        "py",
        "--version",
        "1.0.0",
    ]);
    assert_eq!(escape.status.code(), Some(2), "{}", stderr(&escape));
    let ok = p.run(&[
        "module",
        "publish",
        p.path("code").to_str().unwrap(),
        "--entry",
        "a.py",
        "--name",
        "py",
        "--version",
        "1.0.0",
    ]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    p.write("code/b.py", "print('b')\n");
    // Same version, other entry: refused (the content differs anyway now).
    let again = p.run(&[
        "module",
        "publish",
        p.path("code").to_str().unwrap(),
        "--entry",
        "b.py",
        "--name",
        "py",
        "--version",
        "1.0.0",
    ]);
    assert_eq!(again.status.code(), Some(2));

    assert!(
        p.run(&["module", "default", "tool", "1.1.0"])
            .status
            .success()
    );
    let d = p.run(&["module", "disable", "tool@1.1.0"]);
    assert_eq!(d.status.code(), Some(2));
    assert!(stderr(&d).contains("is the default"), "{}", stderr(&d));
    assert!(p.run(&["module", "disable", "tool@1.0.0"]).status.success());
    let dep = p.run(&["module", "deprecate", "tool@1.0.0"]);
    assert_eq!(
        dep.status.code(),
        Some(2),
        "a disabled version is not revived by deprecate"
    );
    p.write("junk.mod", "not a tar at all");
    let imp = p.run(&["module", "import", p.path("junk.mod").to_str().unwrap()]);
    assert_eq!(imp.status.code(), Some(78));
    assert!(
        stderr(&imp).contains("junk.mod is not a module archive"),
        "{}",
        stderr(&imp)
    );
}
