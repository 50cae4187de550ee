//! sleep: blocks in a host call (WASI monotonic-clock poll) for --secs seconds.

use csvkit::Error;

const USAGE: &str = "\
sleep: sleep, blocked in the host, then exit 0

usage: sleep [--secs N]

  --secs N  seconds, may be fractional (default: 1)";

fn main() {
    csvkit::run("sleep", USAGE, |args| {
        let secs: f64 = args.parsed("secs", 1.0)?;
        args.finish()?;
        let d = std::time::Duration::try_from_secs_f64(secs)
            .map_err(|_| Error::usage(format!("--secs {secs} is not a valid duration")))?;
        println!("sleeping {secs}s");
        std::thread::sleep(d);
        println!("slept {secs}s");
        Ok(())
    })
}
