//! The step contract: inputs under `/in/<name>/`, outputs under `/out/<name>/`,
//! metrics as JSON lines appended to `$MILLRACE_METRICS`.

use crate::args::Error;
use crate::csv::{self, Table};
use crate::json::{Num, Value, to_compact};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const IN: &str = "/in";
pub const OUT: &str = "/out";

fn check_name(kind: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\']) {
        return Err(Error::usage(format!("bad {kind} name {name:?}: expected a plain name like \"data\"")));
    }
    Ok(())
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::fail(format!("{what} {}: {e}", path.display()))
}

/// Names of the directories under `dir`, sorted (empty if `dir` does not exist).
pub fn dir_names(dir: &str) -> Result<Vec<String>, Error> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("cannot list", Path::new(dir), e)),
    };
    let mut names = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| io_err("cannot list", Path::new(dir), e))?;
        if ent.path().is_dir() {
            names.push(ent.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Names of the mounted inputs (`/in/*`), sorted.
pub fn input_names() -> Result<Vec<String>, Error> {
    dir_names(IN)
}

/// `/in/<name>` for an explicit `--input NAME`, which must be mounted. Without one:
/// `/in/<default>` if mounted, else the only mounted input.
/// (Named inputs are checked directly, so this works even if `/in` itself cannot be listed.)
pub fn input_dir(explicit: Option<&str>, default: &str) -> Result<PathBuf, Error> {
    let mounted = || match input_names() {
        Ok(n) if !n.is_empty() => n.join(", "),
        _ => "none found".to_string(),
    };
    if let Some(name) = explicit {
        check_name("input", name)?;
        let p = Path::new(IN).join(name);
        if p.is_dir() {
            return Ok(p);
        }
        return Err(Error::fail(format!("input {name:?} is not mounted at {IN}/{name} (mounted inputs: {})", mounted())));
    }
    let p = Path::new(IN).join(default);
    if p.is_dir() {
        return Ok(p);
    }
    match input_names().unwrap_or_default().as_slice() {
        [only] => Ok(Path::new(IN).join(only)),
        _ => Err(Error::fail(format!(
            "no input {default:?} at {IN}/{default} and no single other input to use (mounted inputs: {}); pass --input NAME",
            mounted()
        ))),
    }
}

fn has_ext(p: &Path, exts: &[&str]) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Every file under `dir` (recursively, hidden names skipped) whose extension is one
/// of `exts`, sorted by path.
pub fn files_with_ext(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = fs::read_dir(&d).map_err(|e| io_err("cannot list", &d, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| io_err("cannot list", &d, e))?;
            if ent.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let ft = ent.file_type().map_err(|e| io_err("cannot stat", &ent.path(), e))?;
            if ft.is_dir() {
                stack.push(ent.path());
            } else if has_ext(&ent.path(), exts) {
                out.push(ent.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The file to read from an input directory: `dir/<name>` if a name is given, else the
/// single `*.<ext>` file in it (searched recursively).
pub fn find_file(dir: &Path, exts: &[&str], name: Option<&str>) -> Result<PathBuf, Error> {
    if let Some(name) = name {
        let p = dir.join(name);
        if name.split('/').any(|c| c == "..") || !p.is_file() {
            return Err(Error::fail(format!("no file {name:?} in {}", dir.display())));
        }
        return Ok(p);
    }
    let found = files_with_ext(dir, exts)?;
    let kinds = exts.iter().map(|e| format!("*.{e}")).collect::<Vec<_>>().join(" or ");
    match found.len() {
        1 => Ok(found.into_iter().next().unwrap_or_default()),
        0 => Err(Error::fail(format!("no {kinds} file in {}", dir.display()))),
        _ => Err(Error::fail(format!(
            "{} {kinds} files in {} ({}); name one with --file",
            found.len(),
            dir.display(),
            found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

pub fn read_text(path: &Path) -> Result<String, Error> {
    let bytes = fs::read(path).map_err(|e| io_err("cannot read", path, e))?;
    String::from_utf8(bytes).map_err(|_| Error::fail(format!("{} is not UTF-8 text", path.display())))
}

pub fn read_csv(path: &Path) -> Result<Table, Error> {
    csv::parse(&read_text(path)?).map_err(|e| Error::fail(format!("{}: {e}", path.display())))
}

pub fn read_json(path: &Path) -> Result<Value, Error> {
    crate::json::parse(&read_text(path)?).map_err(|e| Error::fail(format!("{}: {e}", path.display())))
}

/// `/out/<name>`, created if the engine did not create it.
pub fn output_dir(name: &str) -> Result<PathBuf, Error> {
    check_name("output", name)?;
    let p = Path::new(OUT).join(name);
    if !p.is_dir() {
        fs::create_dir_all(&p).map_err(|e| io_err("cannot create output directory", &p, e))?;
    }
    Ok(p)
}

pub fn write_file(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), Error> {
    fs::write(path, contents).map_err(|e| io_err("cannot write", path, e))
}

/// One metrics line: `{"name":N,"value":V}` or with `"step":S`.
pub fn metric_line(name: &str, value: f64, step: Option<u64>) -> String {
    #[derive(serde::Serialize)]
    struct Metric<'a> {
        name: &'a str,
        value: Num,
        #[serde(skip_serializing_if = "Option::is_none")]
        step: Option<u64>,
    }
    to_compact(&Metric { name, value: Num(Some(value)), step }) + "\n"
}

/// Appends metrics to `$MILLRACE_METRICS`; does nothing when it is not set
/// (e.g. when the plugin runs outside millrace).
pub fn metrics(items: &[(&str, f64, Option<u64>)]) -> Result<(), Error> {
    let Some(path) = std::env::var_os("MILLRACE_METRICS").filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    let path = PathBuf::from(path);
    let text: String = items.iter().map(|(n, v, s)| metric_line(n, *v, *s)).collect();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .map_err(|e| io_err("cannot open the metrics file", &path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| io_err("cannot write the metrics file", &path, e))
}

pub fn metric(name: &str, value: f64) -> Result<(), Error> {
    metrics(&[(name, value, None)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_lines() {
        assert_eq!(metric_line("rows", 123.0, None), "{\"name\":\"rows\",\"value\":123}\n");
        assert_eq!(metric_line("a\"b", 0.5, Some(3)), "{\"name\":\"a\\\"b\",\"value\":0.5,\"step\":3}\n");
        assert_eq!(metric_line("x", f64::NAN, None), "{\"name\":\"x\",\"value\":null}\n");
    }

    #[test]
    fn names() {
        assert!(check_name("input", "data").is_ok());
        for bad in ["", ".", "..", "a/b"] {
            assert!(check_name("input", bad).is_err());
        }
    }

    #[test]
    fn find_files() {
        let d = std::env::temp_dir().join(format!("csvkit-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("sub")).unwrap();
        assert!(find_file(&d, &["csv"], None).unwrap_err().to_string().contains("no *.csv file"));
        fs::write(d.join("sub/a.CSV"), "x\n").unwrap();
        fs::write(d.join(".hidden.csv"), "x\n").unwrap();
        assert_eq!(find_file(&d, &["csv"], None).unwrap(), d.join("sub/a.CSV"));
        fs::write(d.join("b.csv"), "x\n").unwrap();
        assert!(find_file(&d, &["csv"], None).unwrap_err().to_string().contains("--file"));
        assert_eq!(find_file(&d, &["csv"], Some("b.csv")).unwrap(), d.join("b.csv"));
        assert!(find_file(&d, &["csv"], Some("../x.csv")).is_err());
        fs::remove_dir_all(&d).unwrap();
    }
}
