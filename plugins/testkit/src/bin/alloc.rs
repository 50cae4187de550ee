//! alloc: grows memory in 16 MiB chunks (each page touched) up to --mib.

use csvkit::Error;
use csvkit::args::{self, Long};
use std::hint::black_box;

const USAGE: &str = "\
alloc: allocate memory in 16 MiB chunks, touching every page, up to --mib MiB

usage: alloc [--mib N]

  --mib N  MiB to reach (default: 100000, more than a 32-bit WebAssembly memory holds)

Prints one progress line per chunk to stdout; exits 0 when N MiB are held,
1 with a message when an allocation fails.";

const CHUNK_MIB: u64 = 16;
const PAGE: usize = 4096;

fn main() {
    csvkit::run("alloc", USAGE, |p| {
        let mut mib = vec![];
        while let Some(arg) = p.next()? {
            match arg {
                Long("mib") => mib.push(args::value(p, "mib")?),
                arg => return Err(arg.unexpected().into()),
            }
        }
        let mib: u64 = args::number("mib", mib, 100_000)?;
        let mut held: Vec<Vec<u8>> = Vec::new();
        let mut total: u64 = 0;
        while total < mib {
            let step = CHUNK_MIB.min(mib - total);
            let bytes = (step << 20) as usize;
            let mut v: Vec<u8> = Vec::new();
            if v.try_reserve_exact(bytes).is_err() || held.try_reserve(1).is_err() {
                return Err(Error::fail(format!("allocation of {step} MiB more failed after {total} MiB")));
            }
            v.resize(bytes, 0);
            for i in (0..bytes).step_by(PAGE) {
                v[i] = 1;
            }
            held.push(black_box(v));
            total += step;
            println!("allocated {total} MiB");
        }
        println!("reached {total} MiB");
        Ok(())
    })
}
