//! Slurm's client commands (`scontrol`, `squeue`, `sbatch`, `scancel`), each
//! bounded in time, and what their answers mean.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{SlurmError, Target};

/// One line of `scontrol show job -o ID`, as key → value.
#[derive(Debug, Clone, Default)]
pub struct JobInfo {
    pub fields: HashMap<String, String>,
}

impl JobInfo {
    pub fn parse(line: &str) -> JobInfo {
        let fields = line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        JobInfo { fields }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`, `TIMEOUT`, …
    pub fn state(&self) -> &str {
        self.get("JobState").unwrap_or("UNKNOWN")
    }

    /// The node(s) the job runs on, once it runs.
    pub fn nodes(&self) -> Option<&str> {
        self.get("NodeList")
            .filter(|n| !n.is_empty() && *n != "(null)")
    }

    /// `ExitCode=3:0` → 3.
    pub fn exit_code(&self) -> Option<i32> {
        self.get("ExitCode")?.split(':').next()?.parse().ok()
    }

    pub fn is_finished(&self) -> bool {
        !matches!(
            self.state(),
            "PENDING"
                | "CONFIGURING"
                | "RUNNING"
                | "COMPLETING"
                | "SUSPENDED"
                | "REQUEUED"
                | "RESIZING"
                | "SIGNALING"
                | "STAGE_OUT"
                | "STOPPED"
        )
    }
}

/// Why a job that wrote no result ended, in words. `output` is the job's own
/// output file: without cgroups Slurm kills a job over its `--mem` as FAILED
/// (JobLaunchFailure) and says why only there.
pub fn failure_message(job: &str, info: &JobInfo, output: &str) -> String {
    if output.contains("xceeded job memory limit") || output.contains("exceeded memory limit") {
        return format!(
            "Slurm job {job} went over its memory limit (--mem) and was killed ({})",
            info.state()
        );
    }
    state_message(job, info)
}

/// Why a job that wrote no result ended, by its state.
pub fn state_message(job: &str, info: &JobInfo) -> String {
    let reason = info
        .get("Reason")
        .filter(|r| *r != "None")
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    match info.state() {
        "TIMEOUT" => format!("Slurm job {job} reached its time limit (TIMEOUT){reason}"),
        "OUT_OF_MEMORY" => format!("Slurm job {job} ran out of memory (OUT_OF_MEMORY){reason}"),
        "NODE_FAIL" => format!("Slurm job {job} failed with its node (NODE_FAIL){reason}"),
        "PREEMPTED" => format!("Slurm job {job} was preempted (PREEMPTED){reason}"),
        "CANCELLED" => format!("Slurm job {job} was cancelled (CANCELLED){reason}"),
        "BOOT_FAIL" => format!("Slurm job {job} could not boot its node (BOOT_FAIL){reason}"),
        "DEADLINE" => format!("Slurm job {job} missed its deadline (DEADLINE){reason}"),
        "FAILED" => format!(
            "Slurm job {job} failed with exit code {}{reason}",
            info.exit_code().unwrap_or(-1)
        ),
        other => format!("Slurm job {job} ended {other}{reason}"),
    }
}

/// Runs a Slurm client (`scontrol`, `squeue`, `sbatch`, `scancel`), bounded in
/// time: a controller that does not answer makes it block for long.
async fn slurm_command(
    program: &str,
    args: &[&str],
    secs: u64,
) -> Result<std::process::Output, SlurmError> {
    let mut command = tokio::process::Command::new(program);
    command.args(args).kill_on_drop(true);
    // `sbatch` passes its environment into the job: not the daemon's secrets.
    for var in crate::executor::secrets::hidden_vars() {
        command.env_remove(var);
    }
    tokio::time::timeout(Duration::from_secs(secs), command.output())
        .await
        .map_err(|_| SlurmError::NoAnswer(format!("{program} did not answer within {secs} s")))?
        .map_err(|e| {
            SlurmError::Command(format!(
                "cannot run {program} (is Slurm's client installed?): {e}"
            ))
        })
}

/// `scontrol show job -o ID`: `Ok(None)` when Slurm no longer knows the job
/// (finished longer ago than MinJobAge, or never existed).
pub async fn job_info(job: &str) -> Result<Option<JobInfo>, SlurmError> {
    let out = slurm_command("scontrol", &["show", "job", "-o", job], 30).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stdout.trim().is_empty() {
        if stderr.contains("Invalid job id") {
            return Ok(None);
        }
        return Err(SlurmError::Command(format!(
            "scontrol show job {job}: {}",
            stderr.trim()
        )));
    }
    Ok(Some(JobInfo::parse(stdout.lines().next().unwrap_or(""))))
}

/// The id of the (one) queued or running job named `name`, via `squeue`.
pub async fn job_by_name(name: &str) -> Result<Option<String>, SlurmError> {
    let out = slurm_command("squeue", &["-h", "-n", name, "-o", "%i"], 30).await?;
    if !out.status.success() {
        return Err(SlurmError::Command(format!(
            "squeue -n {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string))
}

/// `scancel ID`, best effort.
pub async fn cancel(job: &str) {
    match slurm_command("scancel", &[job], 30).await {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            tracing::warn!(job, error = %String::from_utf8_lossy(&o.stderr).trim(), "scancel failed")
        }
        Err(e) => tracing::warn!(job, error = %e, "scancel"),
    }
}

/// The `sbatch` arguments for a step: the target's settings, overridden by the
/// step's `timeout` (whole minutes, at least one, with a minute of slack for the
/// executor's own limit to act first), `memory` (plus the runtime's overhead)
/// and `cpus`.
pub fn sbatch_args(
    t: &Target,
    job_name: &str,
    out: &Path,
    timeout: Option<Duration>,
    memory: Option<u64>,
    cpus: Option<f64>,
) -> Vec<String> {
    let mut a = vec![
        "--parsable".to_string(),
        format!("--job-name={job_name}"),
        format!("--output={}", out.display()),
        "--ntasks=1".to_string(),
    ];
    let opt = |flag: &str, v: &Option<String>, a: &mut Vec<String>| {
        if let Some(v) = v {
            a.push(format!("--{flag}={v}"));
        }
    };
    opt("partition", &t.partition, &mut a);
    opt("account", &t.account, &mut a);
    opt("qos", &t.qos, &mut a);
    opt("gpus", &t.gpus, &mut a);
    opt("gres", &t.gres, &mut a);
    match timeout {
        Some(d) => a.push(format!("--time={}", d.as_secs().div_ceil(60) + 1)),
        None => opt("time", &t.time_limit, &mut a),
    }
    match memory {
        // The runtime (wasmtime, the Python interpreter's pages) lives beside the
        // guest's linear memory.
        Some(m) => a.push(format!("--mem={}M", (m >> 20) + RUNTIME_OVERHEAD_MIB)),
        None => opt("mem", &t.mem, &mut a),
    }
    match cpus {
        Some(c) => a.push(format!("--cpus-per-task={}", c.ceil().max(1.0) as u32)),
        None => {
            if let Some(c) = t.cpus_per_task {
                a.push(format!("--cpus-per-task={c}"));
            }
        }
    }
    a.extend(t.extra_args.iter().cloned());
    a
}

/// Memory a job asks for beyond the step's `memory`.
pub const RUNTIME_OVERHEAD_MIB: u64 = 512;

/// `sbatch ARGS SCRIPT` → the job id.
pub async fn submit(args: &[String], script: &Path) -> Result<String, SlurmError> {
    let script = script.display().to_string();
    let all: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .chain([script.as_str()])
        .collect();
    let out = match slurm_command("sbatch", &all, 60).await {
        Ok(o) => o,
        Err(e @ SlurmError::NoAnswer(_)) => {
            // It may have submitted the job all the same: no untracked job is left.
            if let Some(name) = args.iter().find_map(|a| a.strip_prefix("--job-name="))
                && let Ok(Some(id)) = job_by_name(name).await
            {
                cancel(&id).await;
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if !out.status.success() {
        return Err(SlurmError::Command(format!(
            "sbatch refused the job: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // `--parsable` prints `ID` or `ID;CLUSTER`.
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit() || c == '_') {
        return Err(SlurmError::Command(format!(
            "sbatch printed no job id: {}",
            text.trim()
        )));
    }
    Ok(id)
}

/// Copies a directory tree (files and directories only; symlinks are skipped).
pub fn copy_tree(from: &Path, to: &Path, depth_limit: usize) -> std::io::Result<()> {
    // What comes back is the guest's: copied without recursion, depth-limited.
    crate::store::walk::copy_tree(from, to, depth_limit)
}

/// Cancels the job and removes its staging directory when dropped, unless
/// disarmed: a cancelled step leaves neither a job nor its files. When `keep`
/// says so (the daemon is shutting down), the job is left running for the next
/// start to adopt.
pub struct CancelOnDrop {
    pub job: Option<String>,
    pub staging: PathBuf,
    pub keep: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if (self.keep)() {
            if let Some(job) = &self.job {
                tracing::info!(job = %job, "leaving the Slurm job running for the next start to adopt");
            }
            return;
        }
        // Synchronous, and bounded: a process about to exit (a cancelled CLI run)
        // would never run a spawned task.
        if let Some(job) = self.job.take() {
            cancel_blocking(&job);
        }
        let _ = crate::store::walk::remove_tree(&self.staging);
    }
}

/// `scancel ID` from a destructor: waits at most 10 s.
fn cancel_blocking(job: &str) {
    let child = std::process::Command::new("scancel")
        .arg(job)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        tracing::warn!(job, "cannot run scancel");
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(job, "scancel did not finish within 10 s");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scontrol_lines_parse_into_state_node_and_exit_code() {
        let i = JobInfo::parse(
            "JobId=17 JobName=millrace-3-train-1 UserId=root(0) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) ExitCode=3:0 NodeList=localhost BatchHost=localhost",
        );
        assert_eq!(i.state(), "FAILED");
        assert_eq!(i.nodes(), Some("localhost"));
        assert_eq!(i.exit_code(), Some(3));
        assert!(i.is_finished());
        assert_eq!(
            state_message("17", &i),
            "Slurm job 17 failed with exit code 3 (NonZeroExitCode)"
        );
        let p = JobInfo::parse("JobId=18 JobState=PENDING Reason=Resources NodeList=(null)");
        assert!(!p.is_finished());
        assert_eq!(p.nodes(), None);
        let m = JobInfo::parse("JobId=16 JobState=FAILED Reason=JobLaunchFailure ExitCode=0:9");
        assert_eq!(
            failure_message(
                "16",
                &m,
                "slurmstepd-localhost: error: Exceeded job memory limit\n"
            ),
            "Slurm job 16 went over its memory limit (--mem) and was killed (FAILED)"
        );
        let t = JobInfo::parse("JobId=19 JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15");
        assert_eq!(
            state_message("19", &t),
            "Slurm job 19 reached its time limit (TIMEOUT) (TimeLimit)"
        );
    }

    #[test]
    fn step_limits_override_the_target_and_round_up() {
        let t = Target {
            partition: Some("gpu".into()),
            time_limit: Some("2:00:00".into()),
            mem: Some("8G".into()),
            cpus_per_task: Some(4),
            extra_args: vec!["--exclusive".into()],
            ..Default::default()
        };
        let a = sbatch_args(&t, "j", Path::new("/s/out"), None, None, None);
        assert!(a.contains(&"--partition=gpu".to_string()));
        assert!(a.contains(&"--time=2:00:00".to_string()));
        assert!(a.contains(&"--mem=8G".to_string()));
        assert!(a.contains(&"--cpus-per-task=4".to_string()));
        assert_eq!(a.last().unwrap(), "--exclusive");
        let a = sbatch_args(
            &t,
            "j",
            Path::new("/s/out"),
            Some(Duration::from_secs(90)),
            Some(1 << 30),
            Some(1.5),
        );
        assert!(a.contains(&"--time=3".to_string()), "{a:?}");
        assert!(a.contains(&"--mem=1536M".to_string()), "{a:?}");
        assert!(a.contains(&"--cpus-per-task=2".to_string()), "{a:?}");
    }
}
