//! What the command line exits with, in one place (README "Exit codes"), as just
//! maps its `Error::code()`: 0 ok, 1 a run failed (or anything unforeseen), 2 a
//! usage mistake, 78 bad configuration (sysexits' EX_CONFIG), 130 a cancelled
//! run (128 + SIGINT, what a shell reports for Ctrl-C).
//!
//! Every error is printed once, by [`super::main`]: `error: ` and its message.

use crate::model::RunStatus;

pub const EXIT_OK: i32 = 0;
/// A run that failed, or an error nobody classified.
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_CONFIG: i32 = 78;
pub const EXIT_CANCELLED: i32 = 130;

/// An error of the command line that deserves its own exit code. Messages carry
/// no `error: ` prefix: [`super::main`] writes it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// How the command was called: a bad argument, a name or run that does not
    /// exist, a state that refuses the request.
    #[error("{0}")]
    Usage(String),
    /// Bad configuration: an unreadable file, a missing input, a damaged archive.
    #[error("{0}")]
    Config(String),
    /// A configuration report (its own `file:line:col: error:` lines and its
    /// summary), printed as it is.
    #[error("{0}")]
    Report(String),
    /// The daemon answered a call with an error.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
}

impl Error {
    pub fn usage(message: impl Into<String>) -> Error {
        Error::Usage(message.into())
    }

    pub fn config(message: impl Into<String>) -> Error {
        Error::Config(message.into())
    }

    pub fn code(&self) -> i32 {
        match self {
            Error::Usage(_) => EXIT_USAGE,
            Error::Config(_) | Error::Report(_) => EXIT_CONFIG,
            // The caller's mistake (no token, no such pipeline or run, bad
            // params) is a usage error; the daemon's state (busy, stopping) is not.
            Error::Api { status, .. } => match status {
                401 | 403 | 404 | 422 => EXIT_USAGE,
                _ => EXIT_FAILURE,
            },
        }
    }
}

/// The exit code of a run that ended, the same for `run`, `resume` and
/// `trigger --wait`.
pub fn run_exit_code(status: RunStatus) -> i32 {
    match status {
        RunStatus::Succeeded => EXIT_OK,
        RunStatus::Cancelled => EXIT_CANCELLED,
        _ => EXIT_FAILURE,
    }
}

/// The exit code of any error that reached `main`, and what to print for it.
pub fn report(e: &anyhow::Error) -> (i32, String) {
    let text = format!("{e:#}");
    match e.downcast_ref::<Error>() {
        Some(Error::Report(_)) => (EXIT_CONFIG, text.trim_end().to_string()),
        Some(known) => (known.code(), format!("error: {}", text.trim_end())),
        None => (EXIT_FAILURE, format!("error: {}", text.trim_end())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancelled_run_exits_130_and_errors_map_once() {
        assert_eq!(run_exit_code(RunStatus::Succeeded), 0);
        assert_eq!(run_exit_code(RunStatus::Cancelled), EXIT_CANCELLED);
        assert_eq!(run_exit_code(RunStatus::Failed), EXIT_FAILURE);
        assert_eq!(run_exit_code(RunStatus::Interrupted), EXIT_FAILURE);
        let (code, text) = report(&Error::usage("run 9 not found").into());
        assert_eq!((code, text.as_str()), (2, "error: run 9 not found"));
        let (code, text) = report(&Error::Report("a.toml:1:1: error: x\n".into()).into());
        assert_eq!((code, text.as_str()), (78, "a.toml:1:1: error: x"));
        let api = Error::Api {
            status: 409,
            message: "busy".into(),
        };
        assert_eq!(report(&api.into()), (1, "error: busy (HTTP 409)".into()));
        let other = anyhow::anyhow!("disk full").context("cannot write");
        assert_eq!(report(&other), (1, "error: cannot write: disk full".into()));
    }
}
