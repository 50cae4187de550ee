//! A tiny command-line parser and the `main` wrapper every plugin uses.

use std::fmt;

/// A failure of a plugin. `Usage` prints the usage text and exits 2, `Fail` exits 1.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    Usage(String),
    Fail(String),
}

impl Error {
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }
    pub fn fail(msg: impl Into<String>) -> Self {
        Error::Fail(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) | Error::Fail(m) => f.write_str(m),
        }
    }
}

impl From<String> for Error {
    fn from(m: String) -> Self {
        Error::Fail(m)
    }
}

impl From<&str> for Error {
    fn from(m: &str) -> Self {
        Error::Fail(m.to_string())
    }
}

/// Runs a plugin body: handles `-h`/`--help`, prints errors as
/// `<name>: error: <message>` (plus the usage text for usage errors) and exits
/// 0 (ok), 1 (failure) or 2 (bad arguments). Panics print one line, no backtrace.
pub fn run(name: &'static str, usage: &'static str, body: impl FnOnce(&mut Args) -> Result<(), Error>) -> ! {
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("{name}: internal error: {info}");
    }));
    let mut args = Args::new(std::env::args().skip(1).collect());
    if args.items.iter().any(|a| a == "-h" || a == "--help") {
        println!("{}", usage.trim_end());
        std::process::exit(0);
    }
    match body(&mut args) {
        Ok(()) => std::process::exit(0),
        Err(Error::Usage(m)) => {
            eprintln!("{name}: error: {m}\n\n{}", usage.trim_end());
            std::process::exit(2)
        }
        Err(Error::Fail(m)) => {
            eprintln!("{name}: error: {m}");
            std::process::exit(1)
        }
    }
}

/// Arguments of the form `--name value`, `--name=value` and `--flag`.
/// Options are taken out by name; `finish` rejects whatever is left.
#[derive(Debug, Clone)]
pub struct Args {
    items: Vec<String>,
}

impl Args {
    pub fn new(items: Vec<String>) -> Self {
        Args { items }
    }

    /// Removes every `--name` and reports whether there was one.
    /// `--name=true|false` is accepted too.
    pub fn flag(&mut self, name: &str) -> Result<bool, Error> {
        let long = format!("--{name}");
        let prefix = format!("--{name}=");
        let mut found = false;
        let mut i = 0;
        while i < self.items.len() {
            if self.items[i] == long {
                self.items.remove(i);
                found = true;
            } else if let Some(v) = self.items[i].strip_prefix(&prefix) {
                found = match v {
                    "true" | "1" | "yes" => true,
                    "false" | "0" | "no" => false,
                    _ => return Err(Error::usage(format!("{long} takes no value (got {v:?})"))),
                };
                self.items.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(found)
    }

    /// Removes every `--name VALUE` / `--name=VALUE` and returns the values in order.
    pub fn opt_all(&mut self, name: &str) -> Result<Vec<String>, Error> {
        let long = format!("--{name}");
        let prefix = format!("--{name}=");
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.items.len() {
            if self.items[i] == long {
                if i + 1 >= self.items.len() || self.items[i + 1].starts_with("--") {
                    return Err(Error::usage(format!("{long} needs a value")));
                }
                out.push(self.items.remove(i + 1));
                self.items.remove(i);
            } else if let Some(v) = self.items[i].strip_prefix(&prefix) {
                out.push(v.to_string());
                self.items.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(out)
    }

    /// At most one `--name VALUE`.
    pub fn opt(&mut self, name: &str) -> Result<Option<String>, Error> {
        let mut all = self.opt_all(name)?;
        if all.len() > 1 {
            return Err(Error::usage(format!("--{name} given {} times", all.len())));
        }
        Ok(all.pop())
    }

    /// `--name VALUE` or the default.
    pub fn opt_or(&mut self, name: &str, default: &str) -> Result<String, Error> {
        Ok(self.opt(name)?.unwrap_or_else(|| default.to_string()))
    }

    /// `--name N` parsed with `FromStr`.
    pub fn parsed<T: std::str::FromStr>(&mut self, name: &str, default: T) -> Result<T, Error> {
        match self.opt(name)? {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| Error::usage(format!("--{name}: {v:?} is not a valid number"))),
        }
    }

    /// `--name a,b,c` as a list (empty items dropped); repeated options are concatenated.
    pub fn list(&mut self, name: &str) -> Result<Option<Vec<String>>, Error> {
        let all = self.opt_all(name)?;
        if all.is_empty() {
            return Ok(None);
        }
        let items: Vec<String> = all
            .iter()
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if items.is_empty() {
            return Err(Error::usage(format!("--{name} needs at least one name")));
        }
        Ok(Some(items))
    }

    /// What has not been taken out yet.
    pub fn rest(&self) -> &[String] {
        &self.items
    }

    /// Fails with a usage error if anything is left.
    pub fn finish(&self) -> Result<(), Error> {
        match self.items.first() {
            None => Ok(()),
            Some(a) if a.starts_with('-') => Err(Error::usage(format!("unknown option {a:?}"))),
            Some(a) => Err(Error::usage(format!("unexpected argument {a:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Args {
        Args::new(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn options_and_flags() {
        let mut a = args(&["--input", "raw", "--drop-na", "--filter=a>1", "--filter", "b<2", "--min-rows", "5"]);
        assert_eq!(a.opt_or("input", "data").unwrap(), "raw");
        assert_eq!(a.opt_or("output", "clean").unwrap(), "clean");
        assert!(a.flag("drop-na").unwrap());
        assert_eq!(a.opt_all("filter").unwrap(), vec!["a>1", "b<2"]);
        assert_eq!(a.parsed::<usize>("min-rows", 0).unwrap(), 5);
        a.finish().unwrap();
    }

    #[test]
    fn errors() {
        let mut a = args(&["--input"]);
        assert!(matches!(a.opt("input"), Err(Error::Usage(_))));
        let mut a = args(&["--n", "x"]);
        assert!(matches!(a.parsed::<u32>("n", 1), Err(Error::Usage(_))));
        let a = args(&["--bogus"]);
        assert!(matches!(a.finish(), Err(Error::Usage(_))));
        let mut a = args(&["--x", "1", "--x", "2"]);
        assert!(a.opt("x").is_err());
        let mut a = args(&["--out", "--record-args"]);
        assert!(a.opt("out").is_err());
    }

    #[test]
    fn lists() {
        let mut a = args(&["--select", "a, b,", "--select", "c"]);
        assert_eq!(a.list("select").unwrap().unwrap(), vec!["a", "b", "c"]);
        assert_eq!(a.list("select").unwrap(), None);
    }
}
