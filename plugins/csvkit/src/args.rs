//! Command-line parsing on `lexopt`, and the `main` wrapper every plugin uses.
//!
//! A plugin loops over `parser.next()` and matches the options it knows; the helpers here
//! give every plugin the same conventions and messages: `--name VALUE` or `--name=VALUE`
//! (a value may not start with `--`), `--flag` or `--flag=true|false`, `--name a,b,c` lists.

use std::fmt;
use std::str::FromStr;

pub use lexopt::Parser;
pub use lexopt::prelude::*;

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

/// lexopt's errors in the plugins' words (all usage errors).
impl From<lexopt::Error> for Error {
    fn from(e: lexopt::Error) -> Self {
        Error::usage(match e {
            lexopt::Error::MissingValue { option: Some(o) } => format!("{o} needs a value"),
            lexopt::Error::UnexpectedOption(o) => format!("unknown option {o:?}"),
            lexopt::Error::UnexpectedArgument(a) => match a.to_string_lossy() {
                a if a.starts_with('-') => format!("unknown option {a:?}"),
                a => format!("unexpected argument {a:?}"),
            },
            e => e.to_string(),
        })
    }
}

/// Runs a plugin body: handles `-h`/`--help` (anywhere), prints errors as
/// `<name>: error: <message>` (plus the usage text for usage errors) and exits
/// 0 (ok), 1 (failure) or 2 (bad arguments). Panics print one line, no backtrace.
pub fn run(name: &'static str, usage: &'static str, body: impl FnOnce(&mut Parser) -> Result<(), Error>) -> ! {
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("{name}: internal error: {info}");
    }));
    if std::env::args_os().skip(1).any(|a| a == "-h" || a == "--help") {
        println!("{}", usage.trim_end());
        std::process::exit(0);
    }
    match body(&mut Parser::from_env()) {
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

fn string(v: std::ffi::OsString) -> Result<String, Error> {
    v.into_string().map_err(|v| Error::usage(format!("{v:?} is not UTF-8")))
}

/// The value of option `--name`, just read: `--name=VALUE` or `--name VALUE`, where a
/// VALUE that starts with `--` is taken for a forgotten value.
pub fn value(p: &mut Parser, name: &str) -> Result<String, Error> {
    if let Some(v) = p.optional_value() {
        return string(v);
    }
    match p.value().map(string) {
        Ok(Ok(v)) if !v.starts_with("--") => Ok(v),
        _ => Err(Error::usage(format!("--{name} needs a value"))),
    }
}

/// Flag `--name`, just read: true, or what `--name=true|1|yes|false|0|no` says.
pub fn flag(p: &mut Parser, name: &str) -> Result<bool, Error> {
    match p.optional_value().map(string).transpose()?.as_deref() {
        None | Some("true" | "1" | "yes") => Ok(true),
        Some("false" | "0" | "no") => Ok(false),
        Some(v) => Err(Error::usage(format!("--{name} takes no value (got {v:?})"))),
    }
}

/// At most one value of `--name`.
pub fn once(name: &str, mut values: Vec<String>) -> Result<Option<String>, Error> {
    if values.len() > 1 {
        return Err(Error::usage(format!("--{name} given {} times", values.len())));
    }
    Ok(values.pop())
}

/// At most one `--name N`, parsed with `FromStr` (surrounding spaces allowed), or `default`.
pub fn number<T: FromStr>(name: &str, values: Vec<String>, default: T) -> Result<T, Error> {
    match once(name, values)? {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| Error::usage(format!("--{name}: {v:?} is not a valid number"))),
    }
}

/// `--name a,b,c` (repeatable, concatenated) as a list, empty items dropped;
/// `None` when the option was not given.
pub fn list(name: &str, values: Vec<String>) -> Result<Option<Vec<String>>, Error> {
    if values.is_empty() {
        return Ok(None);
    }
    let items: Vec<String> =
        values.iter().flat_map(|v| v.split(',')).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
    if items.is_empty() {
        return Err(Error::usage(format!("--{name} needs at least one name")));
    }
    Ok(Some(items))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the csv-clean-like loop below made of `argv`.
    #[derive(Debug, Default, PartialEq)]
    struct Opts {
        input: Option<String>,
        drop_na: bool,
        filters: Vec<String>,
        min_rows: usize,
        select: Option<Vec<String>>,
    }

    fn parse(argv: &[&str]) -> Result<Opts, Error> {
        let mut p = Parser::from_iter(std::iter::once("test").chain(argv.iter().copied()));
        let (mut o, mut input, mut min_rows, mut select) = (Opts::default(), vec![], vec![], vec![]);
        while let Some(arg) = p.next()? {
            match arg {
                Long("input") => input.push(value(&mut p, "input")?),
                Long("drop-na") => o.drop_na = flag(&mut p, "drop-na")?,
                Long("filter") => o.filters.push(value(&mut p, "filter")?),
                Long("min-rows") => min_rows.push(value(&mut p, "min-rows")?),
                Long("select") => select.push(value(&mut p, "select")?),
                arg => return Err(arg.unexpected().into()),
            }
        }
        o.input = once("input", input)?;
        o.min_rows = number("min-rows", min_rows, 0)?;
        o.select = list("select", select)?;
        Ok(o)
    }

    fn usage(argv: &[&str]) -> String {
        match parse(argv) {
            Err(Error::Usage(m)) => m,
            other => panic!("{argv:?}: {other:?}"),
        }
    }

    #[test]
    fn options_and_flags() {
        let o = parse(&["--input", "raw", "--drop-na", "--filter=a>1", "--filter", "b<2", "--min-rows", " 5", "--select", "a, b,", "--select=c"]).unwrap();
        assert_eq!(o.input.as_deref(), Some("raw"));
        assert!(o.drop_na);
        assert_eq!(o.filters, vec!["a>1", "b<2"]);
        assert_eq!(o.min_rows, 5);
        assert_eq!(o.select.unwrap(), vec!["a", "b", "c"]);
        assert_eq!(parse(&[]).unwrap(), Opts::default());
        assert!(!parse(&["--drop-na", "--drop-na=no"]).unwrap().drop_na);
        assert!(parse(&["--drop-na=yes"]).unwrap().drop_na);
        assert_eq!(parse(&["--input=--x"]).unwrap().input.as_deref(), Some("--x"));
        assert_eq!(parse(&["--filter", "-1"]).unwrap().filters, vec!["-1"]);
    }

    #[test]
    fn errors() {
        assert_eq!(usage(&["--input"]), "--input needs a value");
        assert_eq!(usage(&["--input", "--drop-na"]), "--input needs a value");
        assert_eq!(usage(&["--min-rows", "x"]), "--min-rows: \"x\" is not a valid number");
        assert_eq!(usage(&["--bogus"]), "unknown option \"--bogus\"");
        assert_eq!(usage(&["-q"]), "unknown option \"-q\"");
        assert_eq!(usage(&["-"]), "unknown option \"-\"");
        assert_eq!(usage(&["stray"]), "unexpected argument \"stray\"");
        assert_eq!(usage(&["--drop-na", "stray"]), "unexpected argument \"stray\"");
        assert_eq!(usage(&["--input", "1", "--input", "2", "--input=3"]), "--input given 3 times");
        assert_eq!(usage(&["--drop-na=maybe"]), "--drop-na takes no value (got \"maybe\")");
        assert_eq!(usage(&["--select", " , "]), "--select needs at least one name");
    }
}
