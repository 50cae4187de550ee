//! The files of a Slurm job under the target's `shared_dir`: the staged sandbox
//! directories, the program, `spec.json` for `exec-step` and the batch script.

use std::path::{Path, PathBuf};

use super::{JobSpec, SlurmError, copy_tree};
use crate::executor::{AttemptSpec, Label, Mount, Program};

/// Where an attempt's job keeps its files (all under `dir`).
pub(super) struct Files {
    pub dir: PathBuf,
    /// Written by `exec-step` as its last act.
    pub result: PathBuf,
    /// The guest's stdout and stderr, on the node.
    pub step_log: PathBuf,
    /// The job's own output (Slurm's messages).
    pub job_out: PathBuf,
    pub spec: PathBuf,
    pub script: PathBuf,
}

impl Files {
    pub fn new(dir: PathBuf) -> Files {
        Files {
            result: dir.join("result.json"),
            step_log: dir.join("step.log"),
            job_out: dir.join("job.out"),
            spec: dir.join("spec.json"),
            script: dir.join("job.sh"),
            dir,
        }
    }
}

/// A mount of the attempt, and its copy under the staging directory.
pub(super) struct Staged {
    pub mount: Mount,
    /// `None`: the node sees the host path itself (the Python runtime).
    pub copy: Option<PathBuf>,
}

/// Mounts inside the run's work dir, and the step's secrets, are staged (m0, m1,
/// …, in order); the others (the Python runtime) are expected at the same path
/// on the nodes.
pub(super) fn plan(mounts: &[Mount], work: &Path, staging: &Path) -> Vec<Staged> {
    mounts
        .iter()
        .enumerate()
        .map(|(k, m)| Staged {
            mount: m.clone(),
            copy: (m.host.starts_with(work) || m.guest == crate::executor::secrets::GUEST_DIR)
                .then(|| staging.join(format!("m{k}"))),
        })
        .collect()
}

/// Creates the staging directory afresh and writes the job's files into it.
pub(super) fn write(
    files: &Files,
    staged: &[Staged],
    spec: &AttemptSpec,
    label: &Label,
) -> Result<(), SlurmError> {
    let err = SlurmError::Stage;
    let staging = &files.dir;
    let _ = crate::store::walk::remove_tree(staging);
    std::fs::create_dir_all(staging)
        .map_err(|e| err(format!("cannot create {}: {e}", staging.display())))?;
    // Only this daemon's user may read or plant files there.
    if let Some(dir) = staging.parent() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err(format!("cannot restrict {}: {e}", dir.display())))?;
    }
    let mut mounts = Vec::new();
    for s in staged {
        if let Some(c) = &s.copy {
            copy_tree(&s.mount.host, c, spec.walk.depth).map_err(|e| {
                err(format!(
                    "cannot stage {} into {}: {e}",
                    s.mount.guest,
                    c.display()
                ))
            })?;
        }
        mounts.push(Mount {
            host: s.copy.clone().unwrap_or_else(|| s.mount.host.clone()),
            ..s.mount.clone()
        });
    }
    let Program::Wasm {
        path,
        digest,
        shared,
    } = &spec.program
    else {
        return Err(err("a Slurm job runs a wasm or Python step".into()));
    };
    let program = if *shared {
        path.clone()
    } else {
        let p = staging.join("program.wasm");
        std::fs::copy(path, &p).map_err(|e| err(format!("cannot stage the program: {e}")))?;
        p
    };
    let job = JobSpec {
        program,
        digest: digest.clone(),
        args: spec.args.clone(),
        env: spec.env.clone(),
        mounts,
        memory: spec.memory(),
        timeout_ms: spec.timeout().as_millis() as u64,
        log: files.step_log.clone(),
        log_cap: spec.log_cap,
        result: files.result.clone(),
        output_cap: spec.disk_cap,
        walk: spec.walk,
        redact: spec.log.redactions(),
    };
    let exe = std::env::current_exe()
        .map_err(|e| err(format!("cannot find the millrace binary: {e}")))?;
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "'\\''"));
    let text = serde_json::to_vec_pretty(&job)
        .map_err(|e| err(format!("cannot write the job files: {e}")))?;
    // The spec holds the step's environment, secrets included: its owner's alone.
    private_write(&files.spec, &text)
        .and_then(|()| {
            std::fs::write(
                &files.script,
                format!(
                    "#!/bin/sh\n# millrace: run {} step {} attempt {}\nexec {} exec-step {}\n",
                    label.run,
                    label.step,
                    label.attempt,
                    quote(&exe),
                    quote(&files.spec)
                ),
            )
        })
        .map_err(|e| err(format!("cannot write the job files: {e}")))
}

/// Writes a file only its owner may read (mode 0600 from its creation).
fn private_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}
