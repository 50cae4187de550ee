//! copy: copies every file of every input into one output. Small and fast: the
//! benchmark chains thousands of these.

use csvkit::args::{self, Long, once};
use csvkit::{Error, step};
use std::fs;
use std::io::Write;
use std::path::Path;

const USAGE: &str = "\
copy: copy every file of every input (/in/*/**) into /out/NAME/

usage: copy [--out NAME] [--record-args] [--per-input] [ANY OTHER ARGS...]

  --out NAME     output to write into (default: out)
  --record-args  append this step's arguments, one line, to /out/NAME/args.txt
                 (after copying, so a chain of copies accumulates one line per step)
  --per-input    copy input X into /out/NAME/X/ instead of merging all inputs

Other arguments are accepted and ignored (use them to vary the cache key).
Inputs are merged in name order, directory trees kept. When two inputs have the same
file: identical content is copied once, args.txt files are concatenated, anything
else is an error.";

fn fail(what: &str, p: &Path, e: std::io::Error) -> Error {
    Error::fail(format!("{what} {}: {e}", p.display()))
}

fn copy_tree(src: &Path, dst: &Path, top: bool) -> Result<u64, Error> {
    let mut n = 0;
    fs::create_dir_all(dst).map_err(|e| fail("cannot create", dst, e))?;
    let rd = fs::read_dir(src).map_err(|e| fail("cannot list", src, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| fail("cannot list", src, e))?;
        let (from, to) = (ent.path(), dst.join(ent.file_name()));
        if from.is_dir() {
            n += copy_tree(&from, &to, false)?;
        } else if to.exists() {
            let new = fs::read(&from).map_err(|e| fail("cannot read", &from, e))?;
            let old = fs::read(&to).map_err(|e| fail("cannot read", &to, e))?;
            if new == old {
                continue;
            }
            if top && ent.file_name() == "args.txt" {
                let mut f = fs::OpenOptions::new().append(true).open(&to).map_err(|e| fail("cannot open", &to, e))?;
                f.write_all(&new).map_err(|e| fail("cannot write", &to, e))?;
                continue;
            }
            return Err(Error::fail(format!(
                "two inputs have different files {} (use --per-input)",
                to.display()
            )));
        } else {
            fs::copy(&from, &to).map_err(|e| Error::fail(format!("cannot copy {} to {}: {e}", from.display(), to.display())))?;
            n += 1;
        }
    }
    Ok(n)
}

fn main() {
    csvkit::run("copy", USAGE, |p| {
        let all: Vec<String> = std::env::args().skip(1).collect();
        let (mut out, mut record, mut per_input) = (vec![], false, false);
        while let Some(arg) = p.next()? {
            match arg {
                Long("out") => out.push(args::value(p, "out")?),
                Long("record-args") => record = args::flag(p, "record-args")?,
                Long("per-input") => per_input = args::flag(p, "per-input")?,
                // Anything else is accepted and ignored (it varies the cache key).
                Long(_) => _ = p.optional_value(),
                _ => {}
            }
        }
        let out = once("out", out)?.unwrap_or_else(|| "out".into());
        let dest = step::output_dir(&out)?;
        let mut files = 0;
        for name in step::input_names()? {
            let to = if per_input { dest.join(&name) } else { dest.clone() };
            files += copy_tree(&Path::new(step::IN).join(&name), &to, true)?;
        }
        if record {
            let p = dest.join("args.txt");
            let mut f = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&p)
                .map_err(|e| Error::fail(format!("cannot open {}: {e}", p.display())))?;
            writeln!(f, "{}", all.join(" ")).map_err(|e| Error::fail(format!("cannot write {}: {e}", p.display())))?;
        }
        println!("copied {files} files");
        Ok(())
    })
}
