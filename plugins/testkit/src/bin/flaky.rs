//! flaky: fails until the attempt number reaches --succeed-on.

use csvkit::args::{self, Long, once};
use csvkit::{Error, step};

const USAGE: &str = "\
flaky: fail (exit 1) unless $MILLRACE_ATTEMPT >= --succeed-on

usage: flaky [--succeed-on N] [--out NAME]

  --succeed-on N  first attempt that succeeds (default: 2; attempts count from 1)
  --out NAME      on success writes /out/NAME/ok.txt (default: out)

A missing MILLRACE_ATTEMPT counts as attempt 1.";

fn main() {
    csvkit::run("flaky", USAGE, |p| {
        let (mut succeed_on, mut out) = (vec![], vec![]);
        while let Some(arg) = p.next()? {
            match arg {
                Long("succeed-on") => succeed_on.push(args::value(p, "succeed-on")?),
                Long("out") => out.push(args::value(p, "out")?),
                arg => return Err(arg.unexpected().into()),
            }
        }
        let succeed_on: u64 = args::number("succeed-on", succeed_on, 2)?;
        let out = once("out", out)?.unwrap_or_else(|| "out".into());
        let attempt = match std::env::var("MILLRACE_ATTEMPT") {
            Err(_) => 1,
            Ok(a) => a.trim().parse::<u64>().map_err(|_| Error::fail(format!("MILLRACE_ATTEMPT={a:?} is not a number")))?,
        };
        if attempt < succeed_on {
            return Err(Error::fail(format!("attempt {attempt} fails on purpose (succeeds from attempt {succeed_on})")));
        }
        step::write_file(&step::output_dir(&out)?.join("ok.txt"), format!("ok on attempt {attempt}\n"))?;
        println!("flaky: attempt {attempt} succeeded");
        Ok(())
    })
}
