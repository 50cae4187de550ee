//! fail: prints a message to stderr and exits with a chosen code (or traps).

const USAGE: &str = "\
fail: print a message to stderr and exit non-zero

usage: fail [--code N] [--message TEXT] [--trap]

  --code N        exit code (default: 3)
  --message TEXT  the message (default: \"fail: failing on purpose with exit code N\")
  --trap          abort instead (a WebAssembly trap) after printing the message";

fn main() {
    csvkit::run("fail", USAGE, |args| {
        let code: i32 = args.parsed("code", 3)?;
        let message = args.opt("message")?;
        let trap = args.flag("trap")?;
        args.finish()?;
        eprintln!("{}", message.unwrap_or_else(|| format!("fail: failing on purpose with exit code {code}")));
        if trap {
            std::process::abort();
        }
        std::process::exit(code)
    })
}
