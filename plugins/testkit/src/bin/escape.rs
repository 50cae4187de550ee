//! escape: tries to get out of the sandbox; exits 0 only if every attempt is denied.

use csvkit::args::{self, Long, once};
use std::fs;
use std::io::Read;

const USAGE: &str = "\
escape: try to break out of the sandbox, one line per attempt:
  ATTEMPT <what>: DENIED <error>   or   ATTEMPT <what>: ALLOWED
exit 0 only if every attempt was denied, else 1

usage: escape [--path P] [--connect HOST:PORT] [--out NAME]

  --path P             also try to stat and read this absolute host path
  --connect HOST:PORT  also try to open a TCP connection
  --out NAME           output used for the /out attempts (default: out, else the first)

Attempts: read /etc/passwd; read /in/../../etc/passwd; read ../secret; stat and
read --path; read through /in/*/link (symlinks placed there by the test); create a
file in, and open for writing a file of, the first input; create /out/../x;
create /out/NAME/probe -> /etc/passwd (and -> ../../etc/passwd) and read through it;
connect to --connect.";

struct Report {
    allowed: usize,
    total: usize,
}

impl Report {
    fn attempt<T>(&mut self, what: &str, r: std::io::Result<T>) {
        self.total += 1;
        match r {
            Ok(_) => {
                self.allowed += 1;
                println!("ATTEMPT {what}: ALLOWED");
            }
            Err(e) => println!("ATTEMPT {what}: DENIED {e}"),
        }
    }
}

fn read(p: &str) -> std::io::Result<usize> {
    let mut f = fs::File::open(p)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)
}

fn sorted_dirs(root: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(root)
        .map(|rd| rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn main() {
    csvkit::run("escape", USAGE, |p| {
        let (mut path, mut connect, mut out) = (vec![], vec![], vec![]);
        while let Some(arg) = p.next()? {
            match arg {
                Long("path") => path.push(args::value(p, "path")?),
                Long("connect") => connect.push(args::value(p, "connect")?),
                Long("out") => out.push(args::value(p, "out")?),
                arg => return Err(arg.unexpected().into()),
            }
        }
        let (path, connect, out) = (once("path", path)?, once("connect", connect)?, once("out", out)?);
        let mut r = Report { allowed: 0, total: 0 };

        r.attempt("read /etc/passwd", read("/etc/passwd"));
        r.attempt("read /in/../../etc/passwd", read("/in/../../etc/passwd"));
        r.attempt("read ../secret", read("../secret"));
        if let Some(p) = &path {
            r.attempt(&format!("stat {p}"), fs::metadata(p));
            r.attempt(&format!("read {p}"), read(p).or_else(|e| fs::read_dir(p).map(|_| 0).map_err(|_| e)));
        }

        let inputs = sorted_dirs("/in");
        for i in &inputs {
            let link = format!("/in/{i}/link");
            if fs::symlink_metadata(&link).is_ok() {
                r.attempt(
                    &format!("follow symlink {link}"),
                    read(&link).or_else(|e| fs::read_dir(&link).map(|_| 0).map_err(|_| e)),
                );
            }
        }
        if let Some(first) = inputs.first() {
            let probe = format!("/in/{first}/escape-probe.txt");
            r.attempt(&format!("create {probe}"), fs::write(&probe, b"escaped\n"));
            let existing = fs::read_dir(format!("/in/{first}"))
                .ok()
                .and_then(|rd| rd.flatten().map(|e| e.path()).find(|p| p.is_file() && !p.ends_with("escape-probe.txt")));
            if let Some(f) = existing {
                // Opened for appending but nothing is written, so nothing is damaged.
                r.attempt(
                    &format!("open {} for writing", f.display()),
                    fs::OpenOptions::new().append(true).open(&f),
                );
            }
        }

        r.attempt("create /out/../x", fs::write("/out/../x", b"escaped\n"));
        let outs = sorted_dirs("/out");
        let out = out.or_else(|| outs.iter().find(|o| *o == "out").or(outs.first()).cloned());
        if let Some(o) = out {
            for target in ["/etc/passwd", "../../etc/passwd"] {
                let link = format!("/out/{o}/escape-probe-link");
                let _ = fs::remove_file(&link);
                #[allow(deprecated)]
                let made = fs::soft_link(target, &link);
                let res = made.and_then(|_| read(&link));
                r.attempt(&format!("read through symlink {link} -> {target}"), res);
                let _ = fs::remove_file(&link);
            }
        }
        if let Some(addr) = &connect {
            r.attempt(&format!("connect to {addr}"), std::net::TcpStream::connect(addr.as_str()));
        }

        println!("{} attempts, {} allowed", r.total, r.allowed);
        if r.allowed > 0 {
            std::process::exit(1);
        }
        Ok(())
    })
}
