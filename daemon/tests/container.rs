//! `container` steps against a real engine: podman's Docker API service, which
//! `scripts/setup-containers.sh` starts (it exports `DOCKER_HOST`) together with
//! the registry-free test image `localhost/millrace-busybox:1`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{ContainerConfig, ContainerCreateBody, ContainerSummaryStateEnum};
use bollard::query_parameters::{
    CommitContainerOptions, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveImageOptionsBuilder,
};

use crate::common::{Project, eventually, stderr, step_error, step_log, step_statuses};
use crate::daemon::Daemon;

const IMAGE: &str = "localhost/millrace-busybox:1";

/// The engine's socket path (from `DOCKER_HOST`, as the daemon finds it).
fn socket() -> String {
    let host = std::env::var("DOCKER_HOST")
        .unwrap_or_else(|_| "unix:///run/podman/podman.sock".to_string());
    host.trim_start_matches("unix://").to_string()
}

/// `call` with a client of the engine, on a runtime of its own: the tests are
/// synchronous, and each call is short.
fn engine<T>(call: impl AsyncFnOnce(&Docker) -> T) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let docker = Docker::connect_with_unix(&socket(), 60, bollard::API_DEFAULT_VERSION)
            .unwrap_or_else(|e| {
                panic!(
                    "no container engine at {}: {e} (run scripts/setup-containers.sh)",
                    socket()
                )
            });
        call(&docker).await
    })
}

/// Whether the container `id` exists (running or not).
fn container_exists(id: &str) -> bool {
    engine(async |d| match d.inspect_container(id, None).await {
        Ok(_) => true,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => false,
        Err(e) => panic!("inspecting container {id}: {e}"),
    })
}

/// Containers (running or not) of run `run` of the project's state directory.
fn containers_of(p: &Project, run: &str) -> Vec<bollard::models::ContainerSummary> {
    let instance = millrace::executor::container::instance_of(&p.path(".state"));
    let filters = HashMap::from([(
        "label".to_string(),
        vec![
            format!("io.millrace.instance={instance}"),
            format!("io.millrace.run={run}"),
        ],
    )]);
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    engine(async |d| d.list_containers(Some(opts)).await).expect("listing containers")
}

/// The id of run `run`'s container once it runs (a minute at most).
fn running_container(p: &Project, run: &str) -> String {
    eventually(60, || {
        containers_of(p, run)
            .into_iter()
            .find(|c| c.state == Some(ContainerSummaryStateEnum::RUNNING))
            .and_then(|c| c.id)
            .ok_or("the container never started".to_string())
    })
}

/// A new image ID under `repo:tag`: a commit of a container of the base image
/// with one more env var (`stamp`).
fn commit_image(repo: &str, tag: &str, stamp: &str) -> String {
    engine(async |d| {
        let body = ContainerCreateBody {
            image: Some(IMAGE.to_string()),
            cmd: Some(vec!["true".to_string()]),
            ..Default::default()
        };
        let id = d
            .create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                body,
            )
            .await
            .expect("creating a container of the base image")
            .id;
        let commit = CommitContainerOptions {
            container: Some(id.clone()),
            repo: Some(repo.to_string()),
            tag: Some(tag.to_string()),
            changes: Some(format!("ENV STAMP={stamp}")),
            ..Default::default()
        };
        d.commit_container(commit, ContainerConfig::default())
            .await
            .expect("committing the image");
        let force = RemoveContainerOptionsBuilder::new().force(true).build();
        d.remove_container(&id, Some(force))
            .await
            .expect("removing the committed container");
        d.inspect_image(&format!("{repo}:{tag}"))
            .await
            .expect("the committed image")
            .id
            .expect("an image id")
    })
}

/// Removes image `id`, whatever uses it: cleanup, so a failure is no test's.
fn remove_image(id: &str) {
    let force = RemoveImageOptionsBuilder::new().force(true).build();
    let _ = engine(async |d| d.remove_image(id, Some(force), None).await);
}

#[test]
fn inputs_are_read_only_outputs_captured_no_network_no_root_and_reuse() {
    let p = Project::new();
    p.write("data/rows.txt", "b\na\nc\n");
    let f = p.write(
        "c.toml",
        &format!(
            r#"
[params]
greeting = "hi"
[inputs.rows]
path = "data/rows.txt"
[[step]]
name = "sort"
container = {{ image = "{IMAGE}", command = ["sh", "-c"], env = {{ FROM_IMAGE_TABLE = "yes" }} }}
args = ["""
set -u
mkdir -p /out/sorted /out/probe
sort /in/rows/rows.txt > /out/sorted/rows.txt
touch /in/rows/new 2>/dev/null && echo in-writable >> /out/probe/p || echo in-readonly >> /out/probe/p
touch /etc/x 2>/dev/null && echo root-writable >> /out/probe/p || echo root-readonly >> /out/probe/p
echo tmp > /tmp/x && echo tmp-writable >> /out/probe/p
ls /sys/class/net >> /out/probe/p
id -u >> /out/probe/p
echo "$MILLRACE_PARAM_GREETING $FROM_IMAGE_TABLE $MILLRACE_STEP" >> /out/probe/p
echo '{{"name":"rows","value":3}}' >> "$MILLRACE_METRICS"
echo sorted the rows
"""]
params = ["greeting"]
inputs = {{ rows = "inputs.rows" }}
outputs = ["sorted", "probe"]
memory = "64MiB"
cpus = 0.5
"#
        ),
    );
    let f = f.to_str().unwrap();
    let out = p.run(&["run", f]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sorted = p.run(&["output", "latest", "sort.sorted"]);
    assert_eq!(String::from_utf8_lossy(&sorted.stdout), "a\nb\nc\n");
    let probe =
        String::from_utf8_lossy(&p.run(&["output", "latest", "sort.probe"]).stdout).into_owned();
    let lines: Vec<&str> = probe.lines().collect();
    assert_eq!(lines[0], "in-readonly", "{probe}");
    assert_eq!(lines[1], "root-readonly", "{probe}");
    assert_eq!(lines[2], "tmp-writable", "{probe}");
    assert_eq!(lines[3], "lo", "only the loopback interface: {probe}");
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    assert_eq!(
        lines[4],
        uid.to_string(),
        "runs as the daemon's uid: {probe}"
    );
    assert_eq!(lines[5], "hi yes sort", "{probe}");
    assert!(step_log(&p, "sort").contains("sorted the rows"));
    let m = p.json(&["metrics", "latest"]);
    assert!(m.to_string().contains("rows"), "{m}");
    // The run record names the image by digest and where it ran.
    let show = p.json(&["runs", "show", "latest"]);
    let placement = &show["steps"][0]["attempts"][0]["placement"];
    assert_eq!(placement["image"], IMAGE, "{show}");
    assert!(
        placement["image_id"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{show}"
    );
    let run_id = show["id"].as_i64().unwrap().to_string();
    assert!(
        containers_of(&p, &run_id).is_empty(),
        "the container is removed after the step"
    );
    // Unchanged: reused. `network = true` changes the key, and explain says so.
    let out = p.run(&["run", f]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(step_statuses(&p, "latest")[0].1, "reused");
    let text = std::fs::read_to_string(f).unwrap().replace(
        "FROM_IMAGE_TABLE = \"yes\" }",
        "FROM_IMAGE_TABLE = \"yes\" }, network = true",
    );
    std::fs::write(f, text).unwrap();
    let plan = p.run(&["plan", f]);
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.contains("container `network` changed: none → bridge"),
        "{plan}"
    );
}

#[test]
fn the_memory_limit_is_reported_as_an_oom_kill() {
    let p = Project::new();
    let f = p.write(
        "oom.toml",
        &format!(
            r#"
[[step]]
name = "hog"
container = {{ image = "{IMAGE}", command = ["sh", "-c", "head -c 300000000 /dev/zero | tail"] }}
memory = "32MiB"
"#
        ),
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = step_error(&p, "hog");
    assert!(e.contains("memory limit of 32MiB"), "{e}");
    assert!(e.contains("137"), "{e}");
}

#[test]
fn a_timeout_kills_and_removes_the_container_and_an_exit_code_is_reported() {
    let p = Project::new();
    let f = p.write(
        "t.toml",
        &format!(
            r#"
[[step]]
name = "slow"
container = {{ image = "{IMAGE}", command = ["sleep", "60"] }}
timeout = "1s"
[[step]]
name = "fails"
container = {{ image = "{IMAGE}", command = ["sh", "-c", "echo about to fail >&2; exit 3"] }}
"#
        ),
    );
    let started = Instant::now();
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "the timeout held"
    );
    let e = step_error(&p, "slow");
    assert!(e.contains("timed out after 1s"), "{e}");
    assert!(step_error(&p, "fails").contains("exited with code 3"));
    assert!(step_log(&p, "fails").contains("about to fail"));
    let show = p.json(&["runs", "show", "latest"]);
    let run_id = show["id"].as_i64().unwrap().to_string();
    eventually(10, || {
        containers_of(&p, &run_id)
            .is_empty()
            .then_some(())
            .ok_or("the timed-out container was not removed".to_string())
    });
}

#[test]
fn retagging_the_image_re_executes_exactly_the_steps_that_use_it() {
    let p = Project::new();
    // A repository name of this test's own, so parallel tests do not collide.
    let repo = format!("localhost/millrace-retag-{}", std::process::id());
    let first = commit_image(&repo, "1", "one");
    let f = p.write(
        "r.toml",
        &format!(
            r#"
[[step]]
name = "uses_retagged"
container = {{ image = "{repo}:1", command = ["sh", "-c", "mkdir /out/o; echo $STAMP > /out/o/stamp"] }}
outputs = ["o"]
[[step]]
name = "uses_base"
container = {{ image = "{IMAGE}", command = ["sh", "-c", "mkdir /out/o; echo base > /out/o/x"] }}
outputs = ["o"]
"#
        ),
    );
    let f = f.to_str().unwrap();
    assert!(p.run(&["run", f]).status.success());
    assert!(p.run(&["run", f]).status.success());
    assert!(
        step_statuses(&p, "latest")
            .iter()
            .all(|(_, s)| s == "reused"),
        "{:?}",
        step_statuses(&p, "latest")
    );
    let second = commit_image(&repo, "1", "two");
    assert_ne!(first, second);
    let out = p.run(&["run", f]);
    assert!(out.status.success(), "{}", stderr(&out));
    let statuses = step_statuses(&p, "latest");
    assert_eq!(
        statuses,
        vec![
            ("uses_retagged".to_string(), "succeeded".to_string()),
            ("uses_base".to_string(), "reused".to_string())
        ]
    );
    let stamp = p.run(&["output", "latest", "uses_retagged.o"]);
    assert_eq!(String::from_utf8_lossy(&stamp.stdout).trim(), "two");
    let explain = p.run(&["explain", "latest", "uses_retagged"]);
    let explain = String::from_utf8_lossy(&explain.stdout);
    assert!(explain.contains("code changed"), "{explain}");
    for id in [&first, &second] {
        remove_image(id);
    }
}

#[test]
fn a_missing_image_or_engine_is_a_clear_error_naming_it() {
    let p = Project::new();
    let f = p.write(
        "m.toml",
        r#"
[[step]]
name = "ghost"
container = { image = "localhost/no-such-image:404", command = ["true"] }
"#,
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = step_error(&p, "ghost");
    assert!(
        e.contains("image `localhost/no-such-image:404` not found"),
        "{e}"
    );
    let out = p
        .cmd(&["run", f.to_str().unwrap()])
        .env("DOCKER_HOST", "unix:///nonexistent/engine.sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = step_error(&p, "ghost");
    assert!(
        e.contains("cannot reach the container engine at unix:///nonexistent/engine.sock"),
        "{e}"
    );
    // Bad settings are configuration errors at their line:col.
    let bad = p.write(
        "bad.toml",
        r#"
[[step]]
name = "b"
container = { command = ["true"], workdir = "rel", network = "yes", volumes = [] }
"#,
    );
    let out = p.run(&["validate", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    let e = stderr(&out);
    for want in [
        "container needs an `image`",
        "container.workdir must be an absolute path",
        "container.network must be true or false",
        "volumes",
    ] {
        assert!(e.contains(want), "missing {want:?} in {e}");
    }
}

#[test]
fn a_daemon_killed_mid_step_removes_the_orphan_container_and_resumes() {
    let p = Project::new();
    p.write(
        "pipelines/slow.toml",
        &format!(
            r#"
[[step]]
name = "wait"
container = {{ image = "{IMAGE}", command = ["sh", "-c", "sleep 3; mkdir /out/done; echo ok > /out/done/x"] }}
outputs = ["done"]
"#
        ),
    );
    let d = Daemon::start(&p);
    let id = d.trigger("slow");
    let orphan = running_container(&p, &id.to_string());
    d.kill9();
    assert!(
        container_exists(&orphan),
        "the killed daemon's container outlives it"
    );
    let d = Daemon::start(&p);
    let r = d.wait_status(id, "succeeded");
    assert!(!container_exists(&orphan), "the orphan was removed");
    assert!(
        d.log_text()
            .contains("removing a container left behind by an interrupted step"),
        "{}",
        d.log_text()
    );
    assert_eq!(r["steps"][0]["status"], "succeeded", "{r}");
    assert!(containers_of(&p, &id.to_string()).is_empty());
}

#[test]
fn a_symlink_out_of_the_sandbox_is_refused_and_the_host_file_untouched() {
    let p = Project::new();
    let victim = p.write("victim/secret.txt", "top secret\n");
    let f = p.write(
        "s.toml",
        &format!(
            r#"
[[step]]
name = "evil"
container = {{ image = "{IMAGE}", command = ["sh", "-c", "rmdir /out/model && ln -s {} /out/model"] }}
outputs = ["model"]
"#,
            victim.parent().unwrap().display()
        ),
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = step_error(&p, "evil");
    assert!(
        e.contains("symbolic links cannot be part of an artifact"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "top secret\n");
}

#[test]
fn a_container_stopped_at_the_disk_cap_is_gone_before_the_next_step_runs() {
    let p = Project::new();
    let f = p.write(
        "cap.toml",
        &format!(
            r#"
[[step]]
name = "fill"
container = {{ image = "{IMAGE}", command = ["sh", "-c", "i=0; while :; do i=$((i+1)); head -c 65536 /dev/zero > /out/o/f$i; done"] }}
outputs = ["o"]
[[step]]
name = "next"
container = {{ image = "{IMAGE}", command = ["sh", "-c", "sleep 2; n=$(ls /out/o | wc -l); echo $n > /out/o/count"] }}
outputs = ["o"]
"#
        ),
    );
    let out = p
        .cmd(&["run", f.to_str().unwrap(), "--max-parallel", "1"])
        .env("MILLRACE_OUTPUT_CAP", "1MiB")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(step_error(&p, "fill").contains("more than the cap of 1MiB"));
    let count = p.run(&["output", "latest", "next.o"]);
    assert_eq!(
        String::from_utf8_lossy(&count.stdout).trim(),
        "0",
        "only its own file: nothing of the stopped container"
    );
}

#[test]
fn an_interrupted_millrace_run_leaves_no_container_behind() {
    let p = Project::new();
    let f = p.write(
        "i.toml",
        &format!(
            r#"
[[step]]
name = "long"
container = {{ image = "{IMAGE}", command = ["sleep", "60"] }}
"#
        ),
    );
    let mut child = p
        .cmd(&["run", f.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    running_container(&p, "1");
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        containers_of(&p, "1").is_empty(),
        "removed before the process exited"
    );
    assert_eq!(step_statuses(&p, "latest")[0].1, "cancelled");
}
