//! `container` steps: an OS image run through the Docker Engine API (docker, or
//! podman's `podman system service`), with the same step contract as every other
//! runtime. The sandbox: no network unless the step asks, `/in` read-only, `/out`,
//! `/tmp` and `/millrace` the only writable places (the root filesystem is
//! read-only unless the step says otherwise), memory and CPU limits, no privileges,
//! every capability dropped, and the daemon's own uid:gid so outputs are its files.
//!
//! Every container carries labels (instance, run, step, attempt) and is removed
//! after its step; containers a crash left behind are found by label and removed
//! ([`remove_orphans`]).

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures_util::StreamExt;

use crate::executor::{AttemptCtx, AttemptSpec, Kill, LogFile, Mount, Outcome, Program};
use crate::model::{ContainerPlacement, Placement};

/// Why a container could not run (or an engine could not be used).
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// No engine answers at the socket; the message says how to start one.
    #[error(
        "cannot reach the container engine at {socket}: {detail} (start it, e.g. `podman system service --time=0 unix:///run/podman/podman.sock`, or set `socket` on a [compute.NAME] kind = \"container\" target)"
    )]
    Unreachable { socket: String, detail: String },
    /// The image is not on the engine, and may not be pulled.
    #[error(
        "image `{image}` not found on the container engine at {socket}; build or load it there (millrace pulls only for a [compute.NAME] kind = \"container\" target with `pull = true`)"
    )]
    ImageNotFound { image: String, socket: String },
    /// The image cannot be pulled or inspected.
    #[error("{0}")]
    Image(String),
    /// The engine refused or did not answer a call.
    #[error("{0}")]
    Engine(String),
}

/// Label keys on every container millrace creates.
pub const LABEL_INSTANCE: &str = "io.millrace.instance";
pub const LABEL_RUN: &str = "io.millrace.run";
pub const LABEL_STEP: &str = "io.millrace.step";
pub const LABEL_ATTEMPT: &str = "io.millrace.attempt";

/// The instance id of a state directory: random, made once and kept in
/// `<state>/instance-id`. It marks the containers, Slurm jobs and staging
/// directories of this state, so two state directories (on one host or on two
/// hosts with the same path) never touch each other's.
pub fn instance_of(state_dir: &std::path::Path) -> String {
    let path = state_dir.join("instance-id");
    let valid = |t: &str| t.len() == 16 && t.bytes().all(|b| b.is_ascii_hexdigit());
    if let Ok(t) = std::fs::read_to_string(&path)
        && valid(t.trim())
    {
        return t.trim().to_string();
    }
    let mut bytes = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    if random.is_err() {
        // No /dev/urandom: the path, the time and the pid.
        let seed = format!(
            "{}-{:?}-{}",
            state_dir.display(),
            std::time::SystemTime::now(),
            std::process::id()
        );
        bytes.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..8]);
    }
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // First writer wins: a process racing us reads the same id back.
    let _ = std::fs::create_dir_all(state_dir);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(mut f) => {
            let _ = std::io::Write::write_all(&mut f, format!("{id}\n").as_bytes());
            id
        }
        Err(_) => std::fs::read_to_string(&path)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| valid(t))
            .unwrap_or(id),
    }
}

/// How long connecting, inspecting or removing may take: an engine that does not
/// answer is an error, not a hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A pull that makes no end in this time fails the steps that need the image.
const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Where the engine is when nothing names it: `$DOCKER_HOST`, else the first
/// socket that exists of podman's (rootless, then system) and docker's.
pub fn default_socket() -> String {
    if let Ok(h) = std::env::var("DOCKER_HOST")
        && !h.is_empty()
    {
        return h;
    }
    let mut candidates = Vec::new();
    if let Ok(x) = std::env::var("XDG_RUNTIME_DIR") {
        candidates.push(format!("{x}/podman/podman.sock"));
    }
    candidates.push("/run/podman/podman.sock".into());
    candidates.push("/var/run/docker.sock".into());
    candidates
        .iter()
        .find(|c| std::path::Path::new(c).exists())
        .map(|c| format!("unix://{c}"))
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
}

/// Connected clients, one per socket, with the API version negotiated once.
#[derive(Default)]
pub struct Engines {
    clients: tokio::sync::Mutex<HashMap<String, Docker>>,
    /// Sockets whose engine runs rootless (a user namespace where uid 0 is the
    /// user that runs the engine).
    rootless: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Engines {
    /// A client for `socket` (`unix:///path`, `/path` or `tcp://host:port`).
    pub async fn connect(&self, socket: &str) -> Result<Docker, ContainerError> {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(socket) {
            return Ok(c.clone());
        }
        let unreachable = |detail: String| ContainerError::Unreachable {
            socket: socket.to_string(),
            detail,
        };
        // Requests carry no timeout of their own (a wait lasts as long as its
        // step); each call that must answer promptly is bounded here instead.
        const NO_TIMEOUT: u64 = 10 * 365 * 24 * 3600;
        let client = if socket.starts_with("tcp://") || socket.starts_with("http://") {
            Docker::connect_with_http(socket, NO_TIMEOUT, bollard::API_DEFAULT_VERSION)
        } else {
            let path = socket.strip_prefix("unix://").unwrap_or(socket);
            if !std::path::Path::new(path).exists() {
                return Err(unreachable("no such socket".into()));
            }
            Docker::connect_with_unix(path, NO_TIMEOUT, bollard::API_DEFAULT_VERSION)
        }
        .map_err(|e| unreachable(e.to_string()))?;
        let client = tokio::time::timeout(CALL_TIMEOUT, client.negotiate_version())
            .await
            .map_err(|_| unreachable("no answer within 30 s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        // A rootless engine's socket belongs to its user; a rootful one's to
        // root. (Asking the engine, `/info`, costs podman 200 ms a connection.)
        let rootless = {
            use std::os::unix::fs::MetadataExt;
            let path = socket.strip_prefix("unix://").unwrap_or(socket);
            std::fs::metadata(path).is_ok_and(|m| m.uid() != 0)
        };
        if rootless {
            self.rootless
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(socket.to_string());
        }
        clients.insert(socket.to_string(), client.clone());
        Ok(client)
    }

    /// Who a container runs as unless the step says: the daemon's own uid:gid,
    /// or on a rootless engine its uid 0 (which is the daemon's user outside),
    /// so that either way the output files belong to the daemon.
    pub fn default_user(&self, socket: &str) -> String {
        if self
            .rootless
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(socket)
        {
            "0:0".to_string()
        } else {
            own_user()
        }
    }
}

/// An image resolved to its content digest (the image ID, `sha256:…`).
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub name: String,
    pub id: String,
    pub socket: String,
}

impl ResolvedImage {
    /// The digest's hex digits: what the cache key holds.
    pub fn digest(&self) -> &str {
        self.id.strip_prefix("sha256:").unwrap_or(&self.id)
    }
}

fn not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Resolves `image` to its content digest on the engine; pulls it first when it
/// is missing and `pull` allows.
pub async fn resolve_image(
    docker: &Docker,
    socket: &str,
    image: &str,
    pull: bool,
) -> Result<ResolvedImage, ContainerError> {
    let failed = ContainerError::Image;
    let inspect = || async {
        tokio::time::timeout(CALL_TIMEOUT, docker.inspect_image(image))
            .await
            .map_err(|_| DockerError::RequestTimeoutError)?
    };
    let found = match inspect().await {
        Ok(i) => i,
        Err(e) if not_found(&e) && pull => {
            let opts = CreateImageOptionsBuilder::new().from_image(image).build();
            let pull = async {
                let mut stream = docker.create_image(Some(opts), None, None);
                while let Some(progress) = stream.next().await {
                    progress.map_err(|e| failed(format!("cannot pull image `{image}`: {e}")))?;
                }
                Ok::<(), ContainerError>(())
            };
            tokio::time::timeout(PULL_TIMEOUT, pull)
                .await
                .map_err(|_| {
                    failed(format!("pulling image `{image}` took more than 30 minutes"))
                })??;
            inspect()
                .await
                .map_err(|e| failed(format!("image `{image}` after pulling it: {e}")))?
        }
        Err(e) if not_found(&e) => {
            return Err(ContainerError::ImageNotFound {
                image: image.to_string(),
                socket: socket.to_string(),
            });
        }
        Err(e) => {
            return Err(failed(format!(
                "cannot inspect image `{image}` at {socket}: {e}"
            )));
        }
    };
    let id = found.id.ok_or_else(|| {
        failed(format!(
            "the engine at {socket} gave no ID for image `{image}`"
        ))
    })?;
    Ok(ResolvedImage {
        name: image.to_string(),
        id,
        socket: socket.to_string(),
    })
}

/// How a container step starts its image (what the step says beside its mounts
/// and limits).
#[derive(Debug, Clone)]
pub struct Launch {
    pub image: ResolvedImage,
    /// The command, `None` for the image's own.
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub workdir: Option<String>,
    /// `uid[:gid]` or a name the image knows; `None` for the daemon's own user
    /// ([`Engines::default_user`]).
    pub user: Option<String>,
    pub network: bool,
    pub read_only_root: bool,
}

/// Everything one container run needs.
struct Spec {
    /// The container's name (unique per attempt).
    name: String,
    image: ResolvedImage,
    cmd: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    /// `uid[:gid]` or a name the image knows.
    user: String,
    network: bool,
    read_only_root: bool,
    memory: u64,
    cpus: Option<f64>,
    binds: Vec<Mount>,
    /// When set, `/tmp` is not the bind of `binds` but a tmpfs the engine makes
    /// of this size (the disk cap): the kernel bounds it, files deleted while open
    /// included, where a walk of a host directory cannot see them.
    tmp_size: Option<u64>,
    labels: HashMap<String, String>,
    timeout: Duration,
    log: LogFile,
}

/// Removes the container when dropped, unless disarmed: a cancelled step (its
/// future dropped) leaves no container behind.
struct Removal {
    docker: Docker,
    socket: String,
    id: Option<String>,
}

impl Removal {
    async fn now(mut self) {
        if let Some(id) = self.id.take() {
            remove(&self.docker, &id).await;
        }
    }
}

impl Drop for Removal {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        // On a unix socket, synchronously: a process about to exit (a cancelled
        // `millrace run`) would never run a spawned task.
        if let Some(path) = self
            .socket
            .strip_prefix("unix://")
            .or_else(|| self.socket.starts_with('/').then_some(self.socket.as_str()))
        {
            if let Err(e) = remove_blocking(path, &id) {
                tracing::warn!(container = %id, error = %e, "cannot remove container");
            }
        } else if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let docker = self.docker.clone();
            handle.spawn(async move { remove(&docker, &id).await });
        }
    }
}

/// `DELETE /containers/ID?force=1&v=1` over a unix socket, bounded at 10 s.
fn remove_blocking(socket: &str, id: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "DELETE /containers/{id}?force=1&v=1 HTTP/1.0\r\nHost: engine\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    // `HTTP/1.x 204` (removed) or 404 (already gone).
    match &head[9..12] {
        b"204" | b"200" | b"404" => Ok(()),
        other => Err(std::io::Error::other(format!(
            "the engine answered {}",
            String::from_utf8_lossy(other)
        ))),
    }
}

async fn remove(docker: &Docker, id: &str) {
    let opts = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    match tokio::time::timeout(CALL_TIMEOUT, docker.remove_container(id, Some(opts))).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if not_found(&e) => {}
        Ok(Err(e)) => tracing::warn!(container = %id, error = %e, "cannot remove container"),
        Err(_) => tracing::warn!(container = %id, "removing the container took too long"),
    }
}

/// The uid:gid of this process: what output files should belong to.
pub fn own_user() -> String {
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    format!("{uid}:{gid}")
}

/// Runs a container step's attempt on its engine: the sandbox directories
/// bind-mounted where the step contract puts them. Where it runs (engine,
/// container name, image) is reported before the container is created. `stop`
/// resolving (the disk cap) kills the container and is the outcome.
pub async fn run_attempt(
    spec: AttemptSpec,
    ctx: &AttemptCtx<'_>,
    stop: impl std::future::Future<Output = Outcome> + Send,
) -> Result<Outcome, ContainerError> {
    let (memory, timeout) = (spec.memory(), spec.timeout());
    let Program::Image(launch) = spec.program else {
        return Err(ContainerError::Engine("not a container step".into()));
    };
    let image = &launch.image;
    let docker = ctx.containers.connect(&image.socket).await?;
    let mut env = spec.env;
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".into(), "/tmp".into()));
    }
    let label = &ctx.label;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let name = format!(
        "millrace-{}-{}-{}-{nanos:08x}",
        label.run,
        label.safe_step(),
        label.attempt
    );
    let labels = HashMap::from([
        (LABEL_INSTANCE.to_string(), label.instance.clone()),
        (LABEL_RUN.to_string(), label.run.to_string()),
        (LABEL_STEP.to_string(), label.step.clone()),
        (LABEL_ATTEMPT.to_string(), label.attempt.to_string()),
    ]);
    (ctx.on_placement)(&Placement::Container(ContainerPlacement {
        engine: image.socket.clone(),
        container: name.clone(),
        image: image.name.clone(),
        image_id: image.id.clone(),
    }));
    let user = launch
        .user
        .clone()
        .unwrap_or_else(|| ctx.containers.default_user(&image.socket));
    let spec = Spec {
        name,
        image: image.clone(),
        cmd: launch.cmd.clone(),
        entrypoint: launch.entrypoint.clone(),
        env,
        workdir: launch.workdir.clone(),
        user,
        network: launch.network,
        read_only_root: launch.read_only_root,
        memory,
        cpus: spec.cpus,
        binds: spec.mounts,
        tmp_size: Some(spec.disk_cap),
        labels,
        timeout,
        log: spec.log,
    };
    run(&docker, spec, stop).await
}

/// Creates, starts and waits for the container, streaming its output into the
/// log; the container is removed whatever happens. `Err` is a container that
/// could not run at all.
/// `stop` resolving kills the container; it is removed before this returns.
async fn run(
    docker: &Docker,
    spec: Spec,
    stop: impl std::future::Future<Output = Outcome> + Send,
) -> Result<Outcome, ContainerError> {
    // Typed mounts, not `host:guest:mode` strings: a path may hold a colon.
    let mounts = spec
        .binds
        .iter()
        .map(|b| match spec.tmp_size {
            Some(size) if b.guest == "/tmp" => tmpfs(&b.guest, size),
            _ => bollard::models::Mount {
                source: Some(b.host.display().to_string()),
                target: Some(b.guest.clone()),
                typ: Some(bollard::models::MountType::BIND),
                read_only: Some(!b.writable),
                ..Default::default()
            },
        })
        .collect();
    if let Some(size) = spec.tmp_size {
        spec.log.note(&format!(
            "/tmp is a tmpfs of {} (MILLRACE_OUTPUT_CAP, counted in the memory limit too): writes past it fail with ENOSPC",
            crate::definition::format_size(size)
        ));
    }
    let memory = i64::try_from(spec.memory).unwrap_or(i64::MAX);
    let host_config = HostConfig {
        mounts: Some(mounts),
        network_mode: Some(if spec.network { "bridge" } else { "none" }.into()),
        memory: Some(memory),
        // The same value for memory+swap: no swap, so the limit is the limit.
        memory_swap: Some(memory),
        nano_cpus: spec.cpus.map(|c| (c * 1e9) as i64),
        pids_limit: Some(4096),
        readonly_rootfs: Some(spec.read_only_root),
        privileged: Some(false),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        ..Default::default()
    };
    let body = ContainerCreateBody {
        image: Some(spec.image.id.clone()),
        cmd: spec.cmd.clone(),
        entrypoint: spec.entrypoint.clone(),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        working_dir: spec.workdir.clone(),
        user: Some(spec.user.clone()),
        labels: Some(spec.labels.clone()),
        network_disabled: Some(!spec.network),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        host_config: Some(host_config),
        ..Default::default()
    };
    let opts = CreateContainerOptionsBuilder::new()
        .name(&spec.name)
        .build();
    let created = tokio::time::timeout(CALL_TIMEOUT, docker.create_container(Some(opts), body))
        .await
        .map_err(|_| {
            ContainerError::Engine(
                "the container engine did not create the container within 30 s".into(),
            )
        })?
        .map_err(|e| {
            ContainerError::Engine(format!(
                "cannot create the container: {}",
                engine_message(&e)
            ))
        })?;
    tracing::debug!(container = %short(&created.id), "created");
    let removal = Removal {
        docker: docker.clone(),
        socket: spec.image.socket.clone(),
        id: Some(created.id.clone()),
    };
    spec.log.note(&format!(
        "container {} from image {} ({})",
        short(&created.id),
        spec.image.name,
        spec.image.id
    ));
    let t = std::time::Instant::now();
    let outcome = tokio::select! {
        o = follow(docker, &created.id, &spec) => o,
        o = stop => Ok(o),
    };
    let ran = t.elapsed();
    removal.now().await;
    tracing::debug!(
        container = %short(&created.id),
        run_ms = ran.as_millis() as u64,
        remove_ms = (t.elapsed() - ran).as_millis() as u64,
        "container finished"
    );
    outcome
}

/// A tmpfs at `target` of `size` bytes, mode 1777 like any `/tmp` (the step may
/// run as any user).
fn tmpfs(target: &str, size: u64) -> bollard::models::Mount {
    bollard::models::Mount {
        target: Some(target.to_string()),
        typ: Some(bollard::models::MountType::TMPFS),
        tmpfs_options: Some(bollard::models::MountTmpfsOptions {
            size_bytes: Some(i64::try_from(size).unwrap_or(i64::MAX)),
            mode: Some(0o1777),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn follow(docker: &Docker, id: &str, spec: &Spec) -> Result<Outcome, ContainerError> {
    let failed = ContainerError::Engine;
    // Attached before the start, the output stream holds everything the container
    // writes and ends when it exits (a `logs --follow` opened after a quick exit
    // can miss the end).
    let opts = AttachContainerOptionsBuilder::new()
        .stream(true)
        .logs(true)
        .stdout(true)
        .stderr(true)
        .build();
    let attached = tokio::time::timeout(CALL_TIMEOUT, docker.attach_container(id, Some(opts)))
        .await
        .map_err(|_| {
            ContainerError::Engine("the container engine did not attach within 30 s".into())
        })?
        .map_err(|e| {
            ContainerError::Engine(format!(
                "cannot attach to the container: {}",
                engine_message(&e)
            ))
        })?;
    let (logs_done, mut logs_ended) = tokio::sync::watch::channel(false);
    let logs = {
        let log = spec.log.clone();
        let mut output = attached.output;
        tokio::spawn(async move {
            while let Some(Ok(chunk)) = output.next().await {
                log.append(&chunk.into_bytes());
            }
            let _ = logs_done.send(true);
        })
    };
    tracing::debug!(container = %short(id), "attached");
    tokio::time::timeout(CALL_TIMEOUT, docker.start_container(id, None))
        .await
        .map_err(|_| {
            ContainerError::Engine(
                "the container engine did not start the container within 30 s".into(),
            )
        })?
        .map_err(|e| {
            ContainerError::Engine(format!(
                "the container could not start: {}",
                engine_message(&e)
            ))
        })?;
    tracing::debug!(container = %short(id), "started");
    // The exit, whichever tells first: the engine's wait, or the end of the
    // attached output followed by the container's state (podman's wait polls
    // every 250 ms; the state is there within milliseconds).
    let wait = async {
        let mut stream = docker.wait_container(id, None);
        match stream.next().await {
            Some(Ok(r)) => Ok(r.status_code),
            // bollard reports a non-zero exit as an error carrying the code.
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(failed(format!("waiting for the container: {e}"))),
            None => Err(failed(
                "the container engine ended the wait without a status".into(),
            )),
        }
    };
    let mut ended = logs_ended.clone();
    let exited = async {
        let _ = ended.wait_for(|d| *d).await;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(code) = exit_code(docker, id).await {
                return Ok::<i64, ContainerError>(code);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    };
    let code = match tokio::time::timeout(spec.timeout, async {
        tokio::select! {
            c = wait => c,
            c = exited => c,
        }
    })
    .await
    {
        Ok(code) => code?,
        Err(_) => {
            logs.abort();
            return Ok(Outcome::TimedOut {
                after: spec.timeout,
                then: Some("the container was killed and removed".into()),
            });
        }
    };
    // The output stream ends with the container; give the last lines a moment.
    let _ = tokio::time::timeout(Duration::from_secs(5), logs_ended.wait_for(|d| *d)).await;
    logs.abort();
    tracing::debug!(container = %short(id), code, "container exited");
    let oom = tokio::time::timeout(CALL_TIMEOUT, docker.inspect_container(id, None))
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|c| c.state)
        .and_then(|s| s.oom_killed)
        .unwrap_or(false);
    // 137 is SIGKILL; under a memory limit the kernel's OOM killer is what sends
    // it (some engines on cgroup v1 do not report OOMKilled).
    Ok(if oom || code == 137 {
        Outcome::OutOfMemory {
            limit: spec.memory,
            kill: if oom { Kill::OomKiller } else { Kill::Sigkill },
        }
    } else {
        match i32::try_from(code) {
            Ok(code) => Outcome::Exited(code),
            Err(_) => Outcome::Lost {
                code: None,
                message: format!("exited with code {code}"),
            },
        }
    })
}

/// The exit code once the container has stopped; `None` while it runs (or
/// cannot be inspected).
async fn exit_code(docker: &Docker, id: &str) -> Option<i64> {
    use bollard::models::ContainerStateStatusEnum as S;
    let state = tokio::time::timeout(CALL_TIMEOUT, docker.inspect_container(id, None))
        .await
        .ok()?
        .ok()?
        .state?;
    match state.status? {
        S::EXITED | S::DEAD => state.exit_code,
        _ => None,
    }
}

/// The engine's own message, without bollard's wrapping.
fn engine_message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Removes the containers of `instance` that no live run owns (`is_live(run)`),
/// left behind by a crash. Returns how many were removed.
pub async fn remove_orphans(
    docker: &Docker,
    instance: &str,
    is_live: impl Fn(i64) -> bool,
) -> Result<usize, ContainerError> {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![format!("{LABEL_INSTANCE}={instance}")],
    )]);
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let list = tokio::time::timeout(CALL_TIMEOUT, docker.list_containers(Some(opts)))
        .await
        .map_err(|_| ContainerError::Engine("listing containers took more than 30 s".into()))?
        .map_err(|e| ContainerError::Engine(format!("cannot list containers: {e}")))?;
    let mut removed = 0;
    for c in list {
        let labels = c.labels.unwrap_or_default();
        // Only ours: the filter is the engine's, checked again here.
        if labels.get(LABEL_INSTANCE).map(String::as_str) != Some(instance) {
            continue;
        }
        let run = labels.get(LABEL_RUN).and_then(|r| r.parse().ok());
        if run.is_some_and(&is_live) {
            continue;
        }
        if let Some(id) = c.id {
            tracing::warn!(
                container = %short(&id),
                run = ?run,
                step = labels.get(LABEL_STEP).map(String::as_str).unwrap_or("?"),
                "removing a container left behind by an interrupted step"
            );
            remove(docker, &id).await;
            removed += 1;
        }
    }
    Ok(removed)
}
