//! attack: what a hostile or clumsy step does to its host, one mode per finding of the
//! red-team review. Each mode either succeeds (the host must survive it) or reports
//! how far it got; the host's tests check that the step fails with a named limit and
//! that the daemon carries on.

use csvkit::Error;
use csvkit::args::{self, Long, once};
use std::hint::black_box;

const USAGE: &str = "\
attack: stress the host of a step

usage: attack MODE [options]

  deep --dir D --levels N   nest N directories named `a` under D, each made relative
                            to an open descriptor of its parent (wasip1 builds only)
  recurse                   recurse without bound (the wasm stack)
  recurse-io                as recurse, with a host call (a stat of /tmp) at every depth,
                            so one runs at the deepest point the wasm stack reaches
  fds --file F --count N    open F N times and hold every descriptor
  names --dir D             write `x` and `x\\r` (carriage return) with different bytes
  fill --dir D --mib N      write N MiB into D/fill, 1 MiB at a time
  hide --dir D --mib N      as fill, into a file removed while it is open (no walk sees it)";

fn main() {
    csvkit::run("attack", USAGE, |p| {
        let mode = std::env::args().nth(1).unwrap_or_default();
        let (mut dir, mut levels, mut file, mut count, mut mib) = (vec![], vec![], vec![], vec![], vec![]);
        while let Some(arg) = p.next()? {
            match arg {
                Long("dir") => dir.push(args::value(p, "dir")?),
                Long("levels") => levels.push(args::value(p, "levels")?),
                Long("file") => file.push(args::value(p, "file")?),
                Long("count") => count.push(args::value(p, "count")?),
                Long("mib") => mib.push(args::value(p, "mib")?),
                // The mode, and anything else, is not checked here.
                Long(_) => _ = p.optional_value(),
                _ => {}
            }
        }
        let dir = || Ok::<_, Error>(once("dir", dir.clone())?.unwrap_or_else(|| "/out/o".into()));
        match mode.as_str() {
            "deep" => {
                let dir = dir()?;
                let levels: u64 = args::number("levels", levels, 20_000)?;
                deep(&dir, levels)
            }
            "recurse" => {
                println!("recursing");
                println!("depth {}", recurse(black_box(0)));
                Ok(())
            }
            "recurse-io" => {
                println!("recursing with a host call at every depth");
                println!("depth {}", recurse_io(black_box(0)));
                Ok(())
            }
            "fds" => {
                let file = once("file", file)?.unwrap_or_else(|| "/in/a/x.txt".into());
                let count: u64 = args::number("count", count, 100_000)?;
                let mut held = Vec::new();
                for i in 0..count {
                    match std::fs::File::open(&file) {
                        Ok(f) => held.push(f),
                        Err(e) => {
                            println!("opened {i} descriptors, then: {e}");
                            return Err(Error::fail(format!("open #{i}: {e}")));
                        }
                    }
                }
                println!("opened {count} descriptors");
                Ok(())
            }
            "names" => {
                let dir = dir()?;
                std::fs::write(format!("{dir}/x"), "plain x\n")
                    .map_err(|e| Error::fail(format!("x: {e}")))?;
                std::fs::write(format!("{dir}/x\r"), "attacker's bytes\n")
                    .map_err(|e| Error::fail(format!("x\\r: {e}")))?;
                println!("wrote x and x\\r");
                Ok(())
            }
            "fill" => {
                use std::io::Write;
                let dir = dir()?;
                let mib: u64 = args::number("mib", mib, 1024)?;
                let mut f = std::fs::File::create(format!("{dir}/fill"))
                    .map_err(|e| Error::fail(format!("{dir}/fill: {e}")))?;
                let chunk = vec![7u8; 1 << 20];
                for i in 0..mib {
                    f.write_all(&chunk)
                        .map_err(|e| Error::fail(format!("after {i} MiB: {e}")))?;
                }
                println!("wrote {mib} MiB");
                Ok(())
            }
            "hide" => {
                use std::io::Write;
                let dir = dir()?;
                let mib: u64 = args::number("mib", mib, 1024)?;
                let path = format!("{dir}/hidden");
                let mut f = std::fs::File::create(&path)
                    .map_err(|e| Error::fail(format!("{path}: {e}")))?;
                std::fs::remove_file(&path).map_err(|e| Error::fail(format!("rm {path}: {e}")))?;
                let chunk = vec![7u8; 1 << 20];
                for i in 0..mib {
                    f.write_all(&chunk)
                        .map_err(|e| Error::fail(format!("after {i} MiB: {e}")))?;
                }
                println!("wrote {mib} MiB");
                Ok(())
            }
            other => Err(Error::usage(format!("unknown mode `{other}`"))),
        }
    })
}

/// Calls made so far: a side effect the optimiser must keep, stored in a static
/// rather than on the stack.
static DEPTH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Recursion whose frames live on the wasm stack alone: nothing of it is in linear
/// memory (where a `[u64; 16]` local would put it: the guest's own 1 MiB stack would
/// overflow into an out-of-bounds access long before the engine's wasm stack), and the
/// result is not an accumulation the optimiser could turn into a loop.
#[allow(unconditional_recursion)]
#[inline(never)]
fn recurse(n: u64) -> u64 {
    let depth = DEPTH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    recurse(n.wrapping_mul(3).wrapping_add(1)).rotate_left((depth % 63) as u32 + 1) ^ n
}

/// `recurse`, calling the host at every depth.
#[allow(unconditional_recursion)]
#[inline(never)]
fn recurse_io(n: u64) -> u64 {
    let depth = DEPTH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    recurse_io(n.wrapping_mul(3).wrapping_add(stat_tmp())).rotate_left((depth % 63) as u32 + 1) ^ n
}

/// A host call whose buffers stay out of `recurse_io`'s frame (on the guest's own
/// stack, they would overflow it first).
#[inline(never)]
fn stat_tmp() -> u64 {
    std::fs::metadata("/tmp").map(|m| m.len()).unwrap_or(0)
}

/// Every right wasi_snapshot_preview1 defines (29 bits): a host traps on bits
/// beyond them.
#[cfg(target_env = "p1")]
const ALL_RIGHTS: u64 = (1 << 29) - 1;
/// A directory is opened without the right to write to it as a file (the host
/// answers ISDIR otherwise).
#[cfg(target_env = "p1")]
const DIR_RIGHTS: u64 = ALL_RIGHTS & !(wasi::RIGHTS_FD_WRITE | wasi::RIGHTS_FD_READ);

#[cfg(target_env = "p1")]
fn deep(dir: &str, levels: u64) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let root = std::fs::File::open(dir).map_err(|e| Error::fail(format!("{dir}: {e}")))?;
    let mut fd = root.as_raw_fd() as wasi::Fd;
    for i in 0..levels {
        // SAFETY: plain WASI calls on descriptors this program owns.
        let next = unsafe {
            wasi::path_create_directory(fd, "a")
                .and_then(|()| {
                    wasi::path_open(fd, 0, "a", wasi::OFLAGS_DIRECTORY, DIR_RIGHTS, ALL_RIGHTS, 0)
                })
        };
        match next {
            Ok(child) => {
                if i > 0 {
                    // SAFETY: `fd` was opened above by this loop and is not used again.
                    unsafe {
                        let _ = wasi::fd_close(fd);
                    }
                }
                fd = child;
            }
            Err(e) => {
                println!("nested {i} levels, then: {e}");
                return Err(Error::fail(format!("level {i}: {e}")));
            }
        }
    }
    // SAFETY: a small file in the deepest directory, through its descriptor.
    let _ = unsafe {
        wasi::path_open(fd, 0, "deep.txt", wasi::OFLAGS_CREAT, ALL_RIGHTS, ALL_RIGHTS, 0)
    };
    println!("nested {levels} levels");
    Ok(())
}

#[cfg(not(target_env = "p1"))]
fn deep(_dir: &str, _levels: u64) -> Result<(), Error> {
    Err(Error::usage("`deep` needs the wasip1 build (attack-p1.wasm)"))
}
