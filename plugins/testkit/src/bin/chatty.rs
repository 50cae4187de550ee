//! chatty: floods stdout and stderr (to test log size caps).

use csvkit::args::{self, Long};
use std::io::Write;

const USAGE: &str = "\
chatty: print --lines lines of 100 bytes (99 + newline) to stdout and to stderr

usage: chatty [--lines N]

  --lines N  lines per stream (default: 1000)";

fn main() {
    csvkit::run("chatty", USAGE, |p| {
        let mut lines = vec![];
        while let Some(arg) = p.next()? {
            match arg {
                Long("lines") => lines.push(args::value(p, "lines")?),
                arg => return Err(arg.unexpected().into()),
            }
        }
        let lines: u64 = args::number("lines", lines, 1000)?;
        let (out, err) = (std::io::stdout(), std::io::stderr());
        let mut out = std::io::BufWriter::new(out.lock());
        let mut err = std::io::BufWriter::new(err.lock());
        for i in 0..lines {
            // Streams may be closed or capped by the host: stop quietly then.
            if writeln!(out, "{:-<99}", format!("stdout line {i:010} ")).is_err()
                || writeln!(err, "{:-<99}", format!("stderr line {i:010} ")).is_err()
            {
                break;
            }
        }
        let _ = out.flush();
        let _ = err.flush();
        Ok(())
    })
}
