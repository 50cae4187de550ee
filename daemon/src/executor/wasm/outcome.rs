//! How a guest ended, as an [`Outcome`]: its exit code, or a trap told apart by
//! what the host refused ([`Hits`]), and the trap's message for the step's error.

use std::sync::atomic::Ordering;

use wasmtime::{Trap, WasmBacktrace};
use wasmtime_wasi::{I32Exit, ResourceTableError};

use super::LogFile;
use super::{Hits, MAX_WASM_STACK, Outcome, Sandbox, WasmRuntime};

/// The longest trap message a step's error carries (the whole one goes to its log).
const TRAP_MESSAGE_MAX: usize = 600;

impl WasmRuntime {
    /// How a guest that ran to an end (its own, or a trap) ended: the cause of a
    /// trap is told by what the host refused ([`Hits`]), not by its message.
    pub(super) fn ended(
        &self,
        result: wasmtime::Result<i32>,
        hits: &Hits,
        sandbox: &Sandbox,
    ) -> Outcome {
        let disk_hit = *hits.disk.lock().unwrap_or_else(|e| e.into_inner());
        // A refused write fails the step however the guest ended (even with exit 0:
        // what it wrote is incomplete), unless its time ran out.
        let disk_limit = |ended: String, code: Option<i32>| {
            disk_hit.map(|(used, refused)| {
                let size = crate::definition::format_size;
                Outcome::Limit {
                    code,
                    message: format!(
                        "/out, /tmp and /millrace hold {} and a write of {} more was refused (ENOSPC): more than the cap of {} (MILLRACE_OUTPUT_CAP); the step {ended}",
                        size(used),
                        size(refused),
                        size(sandbox.disk)
                    ),
                }
            })
        };
        let exited = |code: i32| {
            if let Some(limit) = disk_limit(
                format!("exited with code {code}"),
                (code != 0).then_some(code),
            ) {
                limit
            } else if code != 0 && hits.descriptors.load(Ordering::Relaxed) {
                Outcome::Limit {
                    code: Some(code),
                    message: format!(
                        "exited with code {code} after the descriptor limit of {} open files refused an open (EMFILE)",
                        self.descriptor_limit
                    ),
                }
            } else {
                Outcome::Exited(code)
            }
        };
        match result {
            Ok(code) => exited(code),
            Err(e) => {
                let trap = e.downcast_ref::<Trap>();
                if let Some(I32Exit(code)) = e.downcast_ref::<I32Exit>() {
                    exited(*code)
                } else if let (Some(Trap::Interrupt), Some(t)) = (trap, sandbox.timeout) {
                    Outcome::TimedOut {
                        after: t,
                        then: None,
                    }
                } else {
                    // The whole error, backtrace included, for whoever reads the log.
                    note_error(&sandbox.log, &e);
                    let msg = trap_message(&e);
                    if hits.memory.load(Ordering::Relaxed)
                        || matches!(trap, Some(Trap::AllocationTooLarge))
                    {
                        Outcome::OutOfMemory {
                            limit: sandbox.memory,
                            kill: crate::executor::Kill::Refused,
                        }
                    } else if matches!(trap, Some(Trap::StackOverflow)) {
                        Outcome::Limit {
                            code: None,
                            message: format!(
                                "wasm stack limit of {} exceeded (unbounded recursion?)",
                                crate::definition::format_size(MAX_WASM_STACK as u64)
                            ),
                        }
                    } else if table_full(&e) {
                        Outcome::Limit {
                            code: None,
                            message: format!(
                                "handle limit of {} open files, directories and streams exceeded",
                                self.handle_limit
                            ),
                        }
                    } else if let Some(limit) = disk_limit(format!("trapped: {msg}"), None) {
                        limit
                    } else {
                        Outcome::Trapped(msg)
                    }
                }
            }
        }
    }
}

/// Whether a host call failed because the guest's resource table is full.
fn table_full(e: &wasmtime::Error) -> bool {
    matches!(
        e.downcast_ref::<ResourceTableError>(),
        Some(ResourceTableError::Full)
    ) || e.chain().any(|c| {
        matches!(
            c.downcast_ref::<ResourceTableError>(),
            Some(ResourceTableError::Full)
        )
    })
}

/// One line for a step's error: every cause of the chain (the trap itself is the
/// innermost) and the innermost frames of the wasm backtrace, bounded in length.
fn trap_message(e: &wasmtime::Error) -> String {
    let backtrace = e.downcast_ref::<WasmBacktrace>();
    // The backtrace is a layer of the chain; it is summarised below instead.
    let bt_text = backtrace.map(|b| b.to_string());
    let causes: Vec<String> = e
        .chain()
        .map(|c| c.to_string())
        .filter(|c| Some(c) != bt_text.as_ref())
        .map(|c| c.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|c| !c.is_empty())
        .collect();
    let mut msg = causes.join(": ");
    if let Some(frames) = backtrace.map(backtrace_summary).filter(|f| !f.is_empty()) {
        msg.push_str(" (in ");
        msg.push_str(&frames);
        msg.push(')');
    }
    // Function names come from the guest's name section: no escape sequences.
    bounded(
        crate::store::artifacts::escape_controls(&msg),
        TRAP_MESSAGE_MAX,
    )
}

/// The innermost frames, a run of one function counted once: "f ← g ×200 ← h …".
fn backtrace_summary(bt: &WasmBacktrace) -> String {
    const FRAMES: usize = 5;
    let mut runs: Vec<(String, usize)> = Vec::new();
    for f in bt.frames() {
        let name = match f.func_name() {
            Some(n) => bounded(n.to_string(), 80),
            None => format!("func #{}", f.func_index()),
        };
        if let Some((_, n)) = runs.last_mut().filter(|(last, _)| *last == name) {
            *n += 1;
        } else if runs.len() == FRAMES {
            runs.push(("…".into(), 1));
            break;
        } else {
            runs.push((name, 1));
        }
    }
    runs.iter()
        .map(|(name, n)| {
            if *n > 1 {
                format!("{name} ×{n}")
            } else {
                name.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ← ")
}

/// `s` cut to at most `max` bytes (at a character boundary), marked when cut.
fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Writes the whole error (its chain and wasm backtrace) into the step's log,
/// bounded: a stack overflow's backtrace has a frame per call.
fn note_error(log: &LogFile, e: &wasmtime::Error) {
    const LINES: usize = 40;
    // The chain by hand: `{e:?}` would add the host's own backtrace.
    let text = e
        .chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join("\ncaused by: ");
    let mut lines = text.lines();
    log.note("the guest's error:");
    for line in lines.by_ref().take(LINES) {
        log.note(&format!("  {}", bounded(line.to_string(), 300)));
    }
    let rest = lines.count();
    if rest > 0 {
        log.note(&format!("  … {rest} more lines"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_cuts_at_a_character_boundary() {
        assert_eq!(bounded("abc".into(), 3), "abc");
        assert_eq!(bounded("abcd".into(), 3), "abc…");
        // "é" is two bytes: a cut inside it moves back before it.
        assert_eq!(bounded("aéb".into(), 2), "a…");
    }

    #[test]
    fn a_trap_message_is_the_whole_chain_on_one_line() {
        let e = wasmtime::Error::msg("wasm trap: out of\nbounds").context("while reading /in/x");
        assert_eq!(
            trap_message(&e),
            "while reading /in/x: wasm trap: out of bounds"
        );
        let long = wasmtime::Error::msg("x".repeat(5000));
        assert!(trap_message(&long).len() <= TRAP_MESSAGE_MAX + '…'.len_utf8());
    }
}
