//! sleep: blocks in a host call (WASI monotonic-clock poll) for --secs seconds.

use csvkit::Error;
use csvkit::args::{self, Long};

const USAGE: &str = "\
sleep: sleep, blocked in the host, then exit 0

usage: sleep [--secs N]

  --secs N  seconds, may be fractional (default: 1)";

fn main() {
    csvkit::run("sleep", USAGE, |p| {
        let mut secs = vec![];
        while let Some(arg) = p.next()? {
            match arg {
                Long("secs") => secs.push(args::value(p, "secs")?),
                arg => return Err(arg.unexpected().into()),
            }
        }
        let secs: f64 = args::number("secs", secs, 1.0)?;
        let d = std::time::Duration::try_from_secs_f64(secs)
            .map_err(|_| Error::usage(format!("--secs {secs} is not a valid duration")))?;
        println!("sleeping {secs}s");
        std::thread::sleep(d);
        println!("slept {secs}s");
        Ok(())
    })
}
