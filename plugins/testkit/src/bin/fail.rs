//! fail: prints a message to stderr and exits with a chosen code (or traps).

const USAGE: &str = "\
fail: print a message to stderr and exit non-zero

usage: fail [--code N] [--message TEXT] [--lines N] [--trap]

  --code N        exit code (default: 3)
  --lines N       first print N lines `fail: line I` to stdout (default: 0)
  --message TEXT  the message (default: \"fail: failing on purpose with exit code N\")
  --trap          abort instead (a WebAssembly trap) after printing the message";

use csvkit::args::{self, Long, once};

fn main() {
    csvkit::run("fail", USAGE, |p| {
        let (mut code, mut message, mut lines, mut trap) = (vec![], vec![], vec![], false);
        while let Some(arg) = p.next()? {
            match arg {
                Long("code") => code.push(args::value(p, "code")?),
                Long("message") => message.push(args::value(p, "message")?),
                Long("lines") => lines.push(args::value(p, "lines")?),
                Long("trap") => trap = args::flag(p, "trap")?,
                arg => return Err(arg.unexpected().into()),
            }
        }
        let code: i32 = args::number("code", code, 3)?;
        let message = once("message", message)?;
        let lines: u64 = args::number("lines", lines, 0)?;
        for i in 0..lines {
            println!("fail: line {i}");
        }
        eprintln!("{}", message.unwrap_or_else(|| format!("fail: failing on purpose with exit code {code}")));
        if trap {
            std::process::abort();
        }
        std::process::exit(code)
    })
}
