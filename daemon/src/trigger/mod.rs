//! Triggers: what fires a pipeline in the daemon. `cron` computes schedules,
//! `watch` resolves and hashes a watched glob; the daemon runs them (see
//! `crate::daemon`).

pub mod cron;
pub mod watch;
