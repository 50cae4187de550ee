//! The state directory under attack or pressure: gc racing runs, datasets and
//! transfers that reach into the state, module archives with links, leftovers of
//! killed processes, permissions, a full disk.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use crate::common::{Project, plugin, stderr, step_error};

fn copy_pipeline(p: &Project) -> String {
    make_then(p, "p", "")
}

/// A pipeline `name`: step `make` copies `data/a.txt` into its output `model`;
/// `more` adds steps after it.
fn make_then(p: &Project, name: &str, more: &str) -> String {
    p.write(
        &format!("{name}.toml"),
        &format!(
            r#"
name = "{name}"
[inputs.a]
path = "data/a.txt"
[[step]]
name = "make"
wasm = "{}"
inputs = {{ x = "inputs.a" }}
outputs = ["model"]
args = ["--out", "model"]
{more}
"#,
            plugin("copy")
        ),
    )
    .display()
    .to_string()
}

/// `make`, then a transfer of its model to `to`.
fn make_then_transfer(p: &Project, to: &str) -> String {
    make_then(
        p,
        "t",
        &format!(
            "[[step]]\nname = \"publish\"\ntransfer = {{ from = \"make.model\", to = \"{to}\" }}"
        ),
    )
}

#[test]
fn gc_never_removes_what_a_run_is_writing() {
    let p = Project::new();
    let f = copy_pipeline(&p);
    p.write("data/a.txt", "first\n");
    assert!(p.run(&["run", &f]).status.success());
    for i in 0..8 {
        let content = format!("version {i}\n");
        p.write("data/a.txt", &content);
        // A run and a gc started together: whichever takes the store first, the
        // run's fresh outputs survive.
        let run = p
            .cmd(&["run", &f])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if i % 2 == 1 {
            std::thread::sleep(std::time::Duration::from_millis(20 * i));
        }
        let gc = p.run(&["gc", "--keep", "1"]);
        let run = run.wait_with_output().unwrap();
        assert!(run.status.success(), "run {i} failed: {}", stderr(&run));
        let gc_err = stderr(&gc);
        assert!(
            gc.status.success() || gc_err.contains("in progress"),
            "gc: {gc_err}"
        );
        let out = p.run(&["output", "latest", "make.model"]);
        assert!(out.status.success(), "iteration {i}: {}", stderr(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), content);
    }
    // A last gc on a quiet store; every remaining output still reads back.
    assert!(p.run(&["gc", "--keep", "1"]).status.success());
    assert!(p.run(&["output", "latest", "make.model"]).status.success());
    crate::common::rehash_store(&p);
}

#[test]
fn an_input_holding_the_state_directory_is_refused() {
    let p = Project::new();
    p.write("data/a.txt", "x\n");
    let f = p.write(
        "whole.toml",
        &format!(
            "name = \"whole\"\n[inputs.all]\npath = \".\"\n[[step]]\nname = \"s\"\nwasm = \"{}\"\ninputs = {{ a = \"inputs.all\" }}\n",
            plugin("noop")
        ),
    );
    // The state directory must exist for the check to matter.
    assert!(p.run(&["runs"]).status.success());
    for cmd in ["run", "plan"] {
        let out = p.run(&[cmd, f.to_str().unwrap()]);
        assert_ne!(out.status.code(), Some(0), "{cmd}");
        let err = stderr(&out);
        assert!(
            err.contains("overlaps the state directory") && err.contains("input `all`"),
            "{cmd}: {err}"
        );
    }
    // Nor anything inside it, directly or through a symlink.
    std::os::unix::fs::symlink(p.path(".state"), p.path("link")).unwrap();
    for inside in [
        ".state/millrace.db",
        ".state/logs",
        "link/objects",
        "./.state/../.state/logs",
    ] {
        let f = p.write(
            "inside.toml",
            &format!(
                "name = \"inside\"\n[inputs.x]\npath = \"{inside}\"\n[[step]]\nname = \"s\"\nwasm = \"{}\"\ninputs = {{ a = \"inputs.x\" }}\n",
                plugin("noop")
            ),
        );
        let out = p.run(&["run", f.to_str().unwrap()]);
        assert_ne!(out.status.code(), Some(0), "{inside}");
        assert!(
            stderr(&out).contains("overlaps the state directory"),
            "{inside}: {}",
            stderr(&out)
        );
    }
    // A Python code directory or a published module inside the state: refused too.
    p.write(".state/logs/x.py", "print('secret')\n");
    let f = p.write(
        "code.toml",
        "name = \"code\"\n[[step]]\nname = \"s\"\npython = { script = \"x.py\", code = \".state/logs\" }\n",
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    let err = format!("{}{}", stderr(&out), step_error(&p, "s"));
    assert!(err.contains("inside the state directory"), "{err}");
    let out = p.run(&[
        "module",
        "publish",
        p.path(".state/logs").to_str().unwrap(),
        "--name",
        "logs",
        "--version",
        "1.0.0",
        "--entry",
        "x.py",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("inside the state directory"));
}

#[test]
fn a_run_waiting_for_gc_can_be_cancelled() {
    let p = Project::new();
    let f = copy_pipeline(&p);
    p.write("data/a.txt", "x\n");
    assert!(p.run(&["runs"]).status.success());
    // A long gc, as the store sees it: the lock held exclusively.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p.path(".state/store.lock"))
        .unwrap();
    lock.lock().unwrap();
    let mut run = p
        .cmd(&["run", &f])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It waits (its run exists, nothing ran) …
    crate::common::eventually(30, || {
        let v = p.json(&["runs"]);
        match v.as_array().and_then(|a| a.first()) {
            Some(r) => Ok(r["id"].clone()),
            None => Err(format!("no run yet: {v}")),
        }
    });
    assert!(run.try_wait().unwrap().is_none(), "the run waits for gc");
    // … and Ctrl-C ends the wait: cancelled, exit 130.
    // SAFETY: a signal to our own child.
    unsafe {
        libc::kill(run.id() as i32, libc::SIGINT);
    }
    let status = crate::common::eventually(30, || {
        run.try_wait()
            .unwrap()
            .ok_or_else(|| "still waiting".to_string())
    });
    assert_eq!(status.code(), Some(130));
    drop(lock);
    let show = p.json(&["runs", "show", "latest"]);
    assert_eq!(show["status"], "cancelled", "{show}");
}

#[test]
fn a_transfer_into_the_state_directory_is_refused() {
    let p = Project::new();
    p.write("data/a.txt", "x\n");
    let f = make_then_transfer(&p, ".state/objects");
    let out = p.run(&["run", &f]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = step_error(&p, "publish");
    assert!(err.contains("overlaps the state directory"), "{err}");
    assert!(
        p.path(".state/objects/blobs").is_dir(),
        "the store is intact"
    );
    assert!(p.run(&["output", "latest", "make.model"]).status.success());
}

/// A module archive as `module export` writes it, but with `code/` given by
/// `code_entry` (a python tarfile snippet adding it).
fn archive_with(p: &Project, name: &str, code_entry: &str) -> std::path::PathBuf {
    let out = p.path(name);
    let script = format!(
        r#"
import io, json, tarfile, sys
t = tarfile.open(sys.argv[1], "w")
meta = json.dumps({{"name": "evil", "version": "1.0.0", "kind": "wasm", "digest": "0" * 64}}).encode()
i = tarfile.TarInfo("millrace-module.json"); i.size = len(meta); t.addfile(i, io.BytesIO(meta))
d = tarfile.TarInfo("code"); d.type = tarfile.DIRTYPE; t.addfile(d)
{code_entry}
t.close()
"#
    );
    let st = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    out
}

#[test]
fn a_module_archive_with_links_or_devices_is_refused() {
    let p = Project::new();
    let cases = [
        (
            "sym.mod",
            "l = tarfile.TarInfo('code/tool.wasm'); l.type = tarfile.SYMTYPE; l.linkname = '/etc/passwd'; t.addfile(l)",
            "symbolic link",
        ),
        (
            "hard.mod",
            "l = tarfile.TarInfo('code/tool.wasm'); l.type = tarfile.LNKTYPE; l.linkname = 'millrace-module.json'; t.addfile(l)",
            "hard link",
        ),
        (
            "fifo.mod",
            "l = tarfile.TarInfo('code/tool.wasm'); l.type = tarfile.FIFOTYPE; t.addfile(l)",
            "FIFO",
        ),
    ];
    for (file, entry, what) in cases {
        let archive = archive_with(&p, file, entry);
        let out = p.run(&["module", "import", archive.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(78), "{file}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(what) && err.contains("only regular files and directories"),
            "{file}: {err}"
        );
        assert!(!err.contains("content is"), "no digest oracle: {err}");
    }
    // A deep archive is refused before anything is unpacked.
    let deep = archive_with(
        &p,
        "deep.mod",
        "t.addfile(tarfile.TarInfo('code/' + 'a/' * 1000 + 'x.wasm'))",
    );
    let out = p.run(&["module", "import", deep.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nests deeper than 256 levels"),
        "{}",
        stderr(&out)
    );
    let list = p.json(&["module", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    // Nothing is left in the staging area either.
    let tmp = std::fs::read_dir(p.path(".state/objects/tmp"))
        .unwrap()
        .count();
    assert_eq!(tmp, 0);
}

#[test]
fn leftovers_of_killed_transfers_and_imports_are_removed() {
    let p = Project::new();
    p.write("data/a.txt", "x\n");
    let f = make_then_transfer(&p, "models/latest");
    // A staging copy of a transfer whose process died (no such pid), and one of a
    // live process (ours) that must be left alone.
    let dead = p.write("models/.latest.millrace-999999999-0/a.txt", "half");
    let live = p.write(
        &format!("models/.latest.millrace-{}-0/a.txt", std::process::id()),
        "in progress",
    );
    assert!(p.run(&["run", &f]).status.success());
    assert!(!dead.parent().unwrap().exists(), "the dead copy is removed");
    assert!(live.exists(), "a live process's copy is left");
    // A module import killed half-way left its staging directory: gc removes it.
    p.write(".state/objects/tmp/module-1-1/code/x.wasm", "half");
    let gc = p.run(&["gc", "--keep", "1"]);
    assert!(gc.status.success(), "{}", stderr(&gc));
    assert!(!p.path(".state/objects/tmp/module-1-1").exists());
}

#[test]
fn the_state_directory_is_private() {
    let p = Project::new();
    let f = copy_pipeline(&p);
    p.write("data/a.txt", "x\n");
    assert!(p.run(&["run", &f]).status.success());
    let mode = |rel: &str| std::fs::metadata(p.path(rel)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(".state"), 0o700);
    assert_eq!(mode(".state/millrace.db"), 0o600);
    assert_eq!(mode(".state/logs"), 0o700);
    // A state made by an older version is tightened at the next open.
    std::fs::set_permissions(
        p.path(".state/millrace.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::set_permissions(
        p.path(".state/logs"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    assert!(p.run(&["runs"]).status.success());
    assert_eq!(mode(".state/millrace.db"), 0o600);
    assert_eq!(mode(".state/logs"), 0o700);
}

/// A small tmpfs, unmounted when dropped (root only).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: std::path::PathBuf, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(&dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk(dir))
    }

    fn fill_leaving(&self, bytes: u64) -> std::path::PathBuf {
        let filler = self.0.join("filler");
        let _ = std::fs::remove_file(&filler);
        // SAFETY: statvfs writes into the struct we pass.
        let avail = unsafe {
            let mut s: libc::statvfs = std::mem::zeroed();
            let c = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
            assert_eq!(libc::statvfs(c.as_ptr(), &mut s), 0);
            s.f_bavail * s.f_frsize
        };
        let st = std::process::Command::new("fallocate")
            .args(["-l", &(avail.saturating_sub(bytes)).to_string()])
            .arg(&filler)
            .status()
            .unwrap();
        assert!(st.success());
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_fails_a_run_cleanly_and_reads_still_work() {
    let p = Project::new();
    // The state directory itself is the small disk.
    let Some(disk) = SmallDisk::mount(p.path(".state"), "16m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let f = copy_pipeline(&p);
    let state = disk.0.clone();
    let cmd = |args: &[&str]| p.run(args);
    p.write("data/a.txt", "first\n");
    let first = cmd(&["run", &f]);
    assert!(first.status.success(), "{}", stderr(&first));
    for left in [4096, 0] {
        let filler = disk.fill_leaving(left);
        // Reading needs no space.
        let runs = cmd(&["runs"]);
        assert!(runs.status.success(), "{}", stderr(&runs));
        p.write("data/a.txt", &format!("left {left}\n"));
        let out = cmd(&["run", &f]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("disk is full"), "{}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"));
        std::fs::remove_file(filler).unwrap();
    }
    // Space is back: a run succeeds.
    let out = cmd(&["run", &f]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A step that fills the disk itself fails, and its run is recorded as failed,
    // not left running.
    let fill = p.write(
        "fill.toml",
        &format!(
            "name = \"fill\"\n[[step]]\nname = \"f\"\nwasm = \"{}\"\nargs = [\"fill\", \"--dir\", \"/out/o\", \"--mib\", \"32\"]\noutputs = [\"o\"]\n",
            plugin("attack")
        ),
    );
    let out = cmd(&["run", fill.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let show = p.json(&["runs", "show", "latest"]);
    assert_eq!(show["status"], "failed", "{show}");
    let out = cmd(&["run", &f]);
    assert!(out.status.success(), "{}", stderr(&out));
    let check = std::process::Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('pragma integrity_check').fetchone()[0])")
        .arg(state.join("millrace.db"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "ok");
}

#[test]
fn a_watch_over_the_state_directory_is_not_fired_by_the_daemons_own_writes() {
    use crate::daemon::Daemon;
    let p = Project::new();
    // The glob covers the project, the state directory included: the project is
    // the datastore (a watch looks inside a datastore or beside its pipeline).
    crate::daemon::config(&p, "[datastores.default]\npath = \".\"\n");
    p.write(
        "pipelines/w.toml",
        &format!(
            "name = \"w\"\n[[trigger]]\nwatch = \"{{drop,.state}}/**\"\ndebounce = \"200ms\"\n[[step]]\nname = \"s\"\nwasm = \"{}\"\n",
            plugin("noop")
        ),
    );
    let d = Daemon::start(&p);
    // A drop fires (written again until the watch, past its first look, sees it).
    let mut i = 0;
    crate::common::eventually(60, || {
        // Once a second: each write restarts the 200 ms debounce.
        if i % 20 == 0 {
            p.write("drop/a.txt", &format!("{i}\n"));
        }
        i += 1;
        let runs = d.runs("w");
        if runs.is_empty() {
            return Err("no run yet".into());
        }
        Ok(())
    });
    let first = d.runs("w")[0]["id"].as_i64().unwrap();
    d.wait_status(first, "succeeded");
    // The run wrote the database and logs; another drop fires the next run, and no
    // run ever lists a file of the state among what changed.
    let before = d.runs("w").len();
    p.write("drop/b.txt", "b\n");
    let runs = crate::common::eventually(60, || {
        let runs = d.runs("w");
        if runs.len() > before && runs.iter().all(|r| r["status"] == "succeeded") {
            Ok(runs)
        } else {
            Err(format!("{runs:?}"))
        }
    });
    for r in &runs {
        let changed = r["trigger_detail"]["changed"].to_string();
        assert!(!changed.contains(".state"), "fired by the state: {r}");
    }
    assert_eq!(runs.len(), before + 1, "{runs:?}");
    assert_eq!(d.stop(), 0);
}
