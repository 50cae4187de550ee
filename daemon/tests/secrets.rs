//! Secrets (SPEC "Secrets"): a step gets its daemon-config secrets as files under
//! `/run/secrets` and, when it asks, as variables; the values reach nothing else
//! millrace keeps but the outputs the step itself writes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::common::{Daemon, Project, config, stderr, step_error, step_log, step_statuses};

const VALUE: &str = "pw-7Zq9-unguessable-Kx3";

/// A Python step that prints its secret (from the file, from its variable and in
/// its whole environment) and writes it to its output `copy`.
const LEAKY: &str = r#"
import os
v = open("/run/secrets/db").read()
print("file:", v)
print("env:", os.environ["DB_PASSWORD"])
print(dict(os.environ))
os.makedirs("/out/copy", exist_ok=True)
open("/out/copy/value.txt", "w").write(v)
"#;

const PIPELINE: &str = r#"
[[step]]
name = "leaky"
python = "leaky.py"
secrets = ["db"]
secret_env = { DB_PASSWORD = "db" }
outputs = ["copy"]
"#;

fn private(p: &Project, rel: &str, text: &str, mode: u32) -> PathBuf {
    let f = p.write(rel, text);
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
    f
}

/// Every file under `dir` whose bytes hold `needle`.
fn files_holding(dir: &Path, needle: &[u8], out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            files_holding(&path, needle, out);
        } else if ft.is_file()
            && let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            out.push(path);
        }
    }
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_secret_reaches_the_step_and_only_the_output_it_writes() {
    let p = Project::new();
    private(&p, "secrets/db", &format!("{VALUE}\n"), 0o600);
    config(&p, "[secrets.db]\nfile = \"secrets/db\"\n");
    p.write("pipelines/leaky.py", LEAKY);
    p.write("pipelines/leak.toml", PIPELINE);
    let d = Daemon::start(&p);
    let id = d.trigger("leak");
    let run = d.wait_run(id, "ended", |r| {
        r["status"] == "succeeded" || r["status"] == "failed"
    });
    if run["status"] != "succeeded" {
        let log = std::fs::read_to_string(p.path(&format!(".state/logs/{id}/leaky.1.log")))
            .unwrap_or_default();
        panic!("{run}\n{log}\n{}", d.log_text());
    }
    let api_log = {
        let mut r = Daemon::agent()
            .get(format!("{}/api/v1/runs/{id}/steps/leaky/logs", d.url()))
            .call()
            .unwrap();
        r.body_mut().read_to_string().unwrap()
    };
    let ui = {
        let mut r = Daemon::agent().get(d.url()).call().unwrap();
        r.body_mut().read_to_string().unwrap()
    };
    let api = [
        ui,
        run.to_string(),
        d.get("/api/v1/runs?pipeline=leak").to_string(),
        d.get("/api/v1/pipelines/leak").to_string(),
        api_log.clone(),
    ];
    d.stop();

    // The step saw it three ways; its log shows the mask where each was printed.
    let log = step_log(&p, "leaky");
    assert!(log.contains("file: ***"), "{log}");
    assert!(log.contains("env: ***"), "{log}");
    assert!(log.contains("'DB_PASSWORD': '***'"), "{log}");
    assert!(api_log.contains("env: ***"), "{api_log}");
    assert!(
        log.contains("***\n{'MILLRACE_RUN_ID'"),
        "lines stay apart: {log}"
    );

    let mut read = api.to_vec();
    read.push(p.json(&["runs", "show", "latest"]).to_string());
    let cfg = p.path("millrace.toml");
    let cfg = cfg.to_str().unwrap();
    let pipeline = p.path("pipelines/leak.toml");
    let pipeline = pipeline.to_str().unwrap();
    for args in [
        vec!["explain", "latest", "leaky"],
        vec!["--json", "explain", "latest", "leaky"],
        vec!["plan", pipeline, "--config", cfg],
        vec!["--json", "plan", pipeline, "--config", cfg],
        vec!["logs", "latest", "leaky"],
    ] {
        let o = p.run(&args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        read.push(text(&o));
    }
    // The key names the secret and the variable, not the value.
    let explain = p.json(&["explain", "latest", "leaky"]);
    assert!(explain.to_string().contains("DB_PASSWORD"), "{explain}");
    for r in &read {
        assert!(!r.contains(VALUE), "the value leaked: {r}");
    }
    // On disk: the database (and its WAL), the logs, the daemon's own log — the
    // value is in the stored output alone.
    let mut hits = Vec::new();
    files_holding(p.dir.path(), VALUE.as_bytes(), &mut hits);
    let source = p.path("secrets/db");
    hits.retain(|h| *h != source);
    assert!(!hits.is_empty(), "the output holds the value");
    for h in &hits {
        assert!(
            h.to_string_lossy().contains("/blobs/")
                && std::fs::read_to_string(h).unwrap() == format!("{VALUE}\n"),
            "the value is in {}",
            h.display()
        );
    }
}

/// `millrace run --config` reads `env` secrets from its own environment. A new
/// value is not a new key: the step is reused (`--no-reuse` runs it); an unset
/// variable fails the step, naming the secret and the variable.
#[test]
fn an_env_secret_rotated_is_reused_and_unset_fails_naming_it() {
    let p = Project::new();
    let cfg = p.write(
        "millrace.toml",
        "pipelines = \"pipelines\"\nstate_dir = \".state\"\n[secrets.db]\nenv = \"MILLRACE_TEST_DB\"\n",
    );
    p.write("pipelines/leaky.py", LEAKY);
    let f = p.write("pipelines/leak.toml", PIPELINE);
    let (cfg, f) = (cfg.to_str().unwrap(), f.to_str().unwrap());
    let run = |value: Option<&str>, extra: &[&str]| {
        let mut c = p.cmd(&["run", f, "--config", cfg]);
        c.args(extra);
        match value {
            Some(v) => c.env("MILLRACE_TEST_DB", v),
            None => c.env_remove("MILLRACE_TEST_DB"),
        };
        c.output().unwrap()
    };
    let o = run(Some(VALUE), &[]);
    assert!(
        o.status.success(),
        "{}\n{}",
        stderr(&o),
        step_log(&p, "leaky")
    );
    let log = step_log(&p, "leaky");
    assert!(log.contains("env: ***") && !log.contains(VALUE), "{log}");

    let o = run(Some("rotated-value-9"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(step_statuses(&p, "latest")[0].1, "reused");
    let o = run(Some("rotated-value-9"), &["--no-reuse"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(step_statuses(&p, "latest")[0].1, "succeeded");
    let log = step_log(&p, "leaky");
    assert!(
        log.contains("env: ***") && !log.contains("rotated-value-9"),
        "{log}"
    );

    let o = run(None, &["--no-reuse"]);
    assert!(!o.status.success());
    let e = step_error(&p, "leaky");
    assert_eq!(
        e,
        "secret `db`: MILLRACE_TEST_DB is not set in the daemon's environment",
        "{}",
        stderr(&o)
    );
    assert!(text(&o).contains("secret `db`"), "{}", text(&o));
}

/// `validate`: an unknown secret at its place, a config needed to check one at
/// all, and a secret file its group or others may read refused in the config.
#[test]
fn unknown_secrets_and_readable_secret_files_are_located_errors() {
    let p = Project::new();
    private(&p, "secrets/db", VALUE, 0o600);
    let cfg = p.write(
        "millrace.toml",
        "pipelines = \"pipelines\"\nstate_dir = \".state\"\n[secrets.db]\nfile = \"secrets/db\"\n",
    );
    p.write("pipelines/leaky.py", LEAKY);
    let f = p.write(
        "pipelines/leak.toml",
        "[[step]]\nname = \"leaky\"\npython = \"leaky.py\"\nsecrets = [\"dv\"]\noutputs = [\"copy\"]\n",
    );
    let (cfg_s, f) = (cfg.to_str().unwrap(), f.to_str().unwrap());
    let o = p.run(&["validate", "--config", cfg_s]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("leak.toml:4:12: error: unknown secret `dv`"),
        "{t}"
    );
    assert!(t.contains("did you mean `db`?"), "{t}");

    let o = p.run(&["validate", f]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains(
            "leak.toml:4:12: error: secret `dv` cannot be checked without the daemon config"
        ),
        "{t}"
    );
    assert!(t.contains("pass --config FILE"), "{t}");

    std::fs::set_permissions(p.path("secrets/db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = p.run(&["validate", "--config", cfg_s, "--config-only"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("millrace.toml:4:8: error: [secrets.db]")
            && t.contains("is readable by its group or others (mode 0644)"),
        "{t}"
    );
}

/// A container step gets the same: a read-only bind at /run/secrets, its
/// variable, its log masked (the rootless engine of `scripts/setup-containers.sh`).
#[test]
fn a_container_step_reads_its_secret_read_only() {
    let p = Project::new();
    let cfg = p.write(
        "millrace.toml",
        "pipelines = \"pipelines\"\nstate_dir = \".state\"\n[secrets.db]\nfile = \"db\"\n",
    );
    private(&p, "db", &format!("{VALUE}\n"), 0o600);
    let f = p.write(
        "pipelines/c.toml",
        &format!(
            r#"
[[step]]
name = "c"
container = {{ image = "{}", command = ["sh", "-c", "cat /run/secrets/db; echo env=$DB_PASSWORD; echo x > /run/secrets/db || echo read-only; mkdir /out/o; cp /run/secrets/db /out/o/"] }}
secrets = ["db"]
secret_env = {{ DB_PASSWORD = "db" }}
outputs = ["o"]
"#,
            "localhost/millrace-busybox:1"
        ),
    );
    let o = p.run(&[
        "run",
        f.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let log = step_log(&p, "c");
    assert!(o.status.success(), "{}\n{log}", stderr(&o));
    assert!(log.contains("***\nenv=***\n"), "{log}");
    assert!(log.contains("read-only"), "{log}");
    assert!(!log.contains(VALUE), "{log}");
}

/// A Slurm job gets the same: its secrets are copied into the job's staging
/// directory (owner only), masked in the node's log, and gone with the job's
/// files: nothing under the shared directory holds the value afterwards.
#[test]
fn a_slurm_step_reads_its_secret_and_the_shared_dir_keeps_nothing() {
    let p = Project::new();
    private(&p, "secrets/db", &format!("{VALUE}\n"), 0o600);
    let cfg = p.write(
        "millrace.toml",
        "pipelines = \"pipelines\"\nstate_dir = \".state\"\n[secrets.db]\nfile = \"secrets/db\"\n[compute.cluster]\nkind = \"slurm\"\nshared_dir = \"shared\"\n",
    );
    p.write("pipelines/leaky.py", LEAKY);
    let f = p.write(
        "pipelines/leak.toml",
        &format!("{PIPELINE}compute = \"cluster\"\n"),
    );
    let o = p.run(&[
        "run",
        f.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let log = step_log(&p, "leaky");
    assert!(o.status.success(), "{}\n{log}", stderr(&o));
    assert!(log.contains("submitted Slurm job"), "{log}");
    assert!(
        log.contains("file: ***") && log.contains("env: ***"),
        "{log}"
    );
    let mut hits = Vec::new();
    files_holding(p.dir.path(), VALUE.as_bytes(), &mut hits);
    hits.retain(|h| *h != p.path("secrets/db"));
    assert!(!hits.is_empty(), "the output holds the value");
    for h in &hits {
        assert!(
            h.to_string_lossy().contains("/blobs/"),
            "the value is in {}",
            h.display()
        );
    }
}

/// A wasm step (the testkit's `env`, which prints its environment and writes it
/// to its output): its variable is masked in the log, kept in the output.
#[test]
fn a_wasm_step_gets_its_secret_variable_masked_in_its_log() {
    let p = Project::new();
    let cfg = p.write(
        "millrace.toml",
        "pipelines = \"pipelines\"\nstate_dir = \".state\"\n[secrets.db]\nenv = \"MILLRACE_TEST_DB\"\n",
    );
    let f = p.write(
        "pipelines/w.toml",
        &format!(
            "[[step]]\nname = \"w\"\nwasm = \"{}\"\nsecrets = [\"db\"]\nsecret_env = {{ DB_PASSWORD = \"db\" }}\noutputs = [\"out\"]\n",
            crate::common::plugin("env")
        ),
    );
    let o = p
        .cmd(&[
            "run",
            f.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .env("MILLRACE_TEST_DB", VALUE)
        .output()
        .unwrap();
    let log = step_log(&p, "w");
    assert!(o.status.success(), "{}\n{log}", stderr(&o));
    assert!(log.contains("DB_PASSWORD=***\n"), "{log}");
    assert!(!log.contains(VALUE), "{log}");
    let mut hits = Vec::new();
    files_holding(p.dir.path(), VALUE.as_bytes(), &mut hits);
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert!(
        std::fs::read_to_string(&hits[0])
            .unwrap()
            .contains(&format!("DB_PASSWORD={VALUE}\n")),
        "{}",
        hits[0].display()
    );
}

/// `sbatch` passes its environment into the job, and Slurm keeps it in its
/// state: an `env = "…"` secret of the daemon is not in it.
#[test]
fn an_env_secret_of_the_daemon_does_not_reach_slurm_s_job_environment() {
    let p = Project::new();
    let cfg = p.write(
        "millrace.toml",
        "pipelines = \"pipelines\"\nstate_dir = \".state\"\n[secrets.db]\nenv = \"MILLRACE_TEST_DB\"\n[compute.cluster]\nkind = \"slurm\"\nshared_dir = \"shared\"\n",
    );
    let f = p.write(
        "pipelines/w.toml",
        &format!(
            "[[step]]\nname = \"w\"\nwasm = \"{}\"\nsecrets = [\"db\"]\noutputs = [\"out\"]\ncompute = \"cluster\"\n",
            crate::common::plugin("env")
        ),
    );
    let o = p
        .cmd(&[
            "run",
            f.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .env("MILLRACE_TEST_DB", VALUE)
        .env("MILLRACE_TEST_NOT_SECRET", "plain-marker-31")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", stderr(&o), step_log(&p, "w"));
    let show = p.json(&["runs", "show", "latest"]);
    let job = show["steps"][0]["attempts"][0]["placement"]["job_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{show}"))
        .to_string();
    let config = std::process::Command::new("scontrol")
        .args(["show", "config"])
        .output()
        .unwrap();
    let state = String::from_utf8_lossy(&config.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("StateSaveLocation")
                .map(|v| v.trim().trim_start_matches('=').trim().to_string())
        })
        .unwrap();
    let env_file = (0..10)
        .map(|h| PathBuf::from(&state).join(format!("hash.{h}/job.{job}/environment")))
        .find(|f| f.exists())
        .unwrap_or_else(|| panic!("job {job}'s environment is not under {state}"));
    let env = std::fs::read(&env_file).unwrap();
    let holds = |s: &str| env.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(
        holds("plain-marker-31"),
        "the file is the job's environment"
    );
    assert!(!holds(VALUE), "the secret is in {}", env_file.display());
}
