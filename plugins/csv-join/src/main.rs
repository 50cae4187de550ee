//! csv-join: the fan-in step. Concatenates CSV files or merges JSON files.

use csvkit::args::{self, Long, once};
use csvkit::{Error, csv, json, ops, step};
use std::path::PathBuf;

const USAGE: &str = "\
csv-join: combine several inputs into one (fan-in)

usage: csv-join [--inputs NAME,...] [--output NAME] [--mode auto|csv|json]

  --inputs NAMES  inputs /in/NAME to combine, in this order (default: every
                  mounted input, sorted by name)
  --output NAME   output directory /out/NAME (default: joined)
  --mode MODE     csv:  each input holds one *.csv; rows are concatenated (same
                        columns required; a different column order is fixed up)
                        into /out/NAME/data.csv
                  json: each input holds one *.json; they are merged into
                        /out/NAME/joined.json as {\"<input name>\": <its JSON>, ...}
                  auto (default): csv if every input holds exactly one *.csv,
                        else json if every input holds exactly one *.json

Metrics: inputs, and rows (csv mode).";

fn main() {
    csvkit::run("csv-join", USAGE, |p| {
        let (mut inputs, mut output, mut mode) = (vec![], vec![], vec![]);
        while let Some(arg) = p.next()? {
            match arg {
                Long("inputs") => inputs.push(args::value(p, "inputs")?),
                Long("output") => output.push(args::value(p, "output")?),
                Long("mode") => mode.push(args::value(p, "mode")?),
                arg => return Err(arg.unexpected().into()),
            }
        }
        let inputs = args::list("inputs", inputs)?;
        let output = once("output", output)?.unwrap_or_else(|| "joined".into());
        let mode = once("mode", mode)?.unwrap_or_else(|| "auto".into());
        if !["auto", "csv", "json"].contains(&mode.as_str()) {
            return Err(Error::usage(format!("--mode must be auto, csv or json (got {mode:?})")));
        }

        let names = match inputs {
            Some(n) => n,
            None => step::input_names()?,
        };
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(Error::usage(format!("input {n:?} listed twice in --inputs")));
            }
        }
        if names.is_empty() {
            return Err(Error::fail("no inputs mounted under /in"));
        }
        let mut dirs = Vec::new();
        for n in &names {
            dirs.push((n.clone(), step::input_dir(Some(n), n)?));
        }
        let only = |ext: &str| -> Result<Vec<Option<PathBuf>>, Error> {
            dirs.iter()
                .map(|(_, d)| {
                    let f = step::files_with_ext(d, &[ext])?;
                    Ok(if f.len() == 1 { f.into_iter().next() } else { None })
                })
                .collect()
        };
        let csvs = only("csv")?;
        let use_csv = match mode.as_str() {
            "csv" => true,
            "json" => false,
            _ => csvs.iter().all(Option::is_some),
        };
        let dest = step::output_dir(&output)?;
        if use_csv {
            let mut parts = Vec::new();
            for ((name, dir), file) in dirs.iter().zip(csvs) {
                let path = match file {
                    Some(p) => p,
                    None => step::find_file(dir, &["csv"], None)?, // explains 0 or several
                };
                parts.push((name.clone(), step::read_csv(&path)?));
            }
            let joined = ops::concat(parts).map_err(Error::fail)?;
            step::write_file(&dest.join("data.csv"), csv::write(&joined))?;
            eprintln!("csv-join: {} CSV inputs, {} rows", names.len(), joined.rows.len());
            step::metrics(&[("inputs", names.len() as f64, None), ("rows", joined.rows.len() as f64, None)])
        } else {
            let jsons = only("json")?;
            if mode == "auto" && jsons.iter().any(Option::is_none) {
                return Err(Error::fail(
                    "--mode auto: every input must hold exactly one *.csv file or every input exactly one *.json file; \
                     pass --mode csv or --mode json to see which input does not",
                ));
            }
            let mut parts = Vec::new();
            for ((name, dir), file) in dirs.iter().zip(jsons) {
                let path = match file {
                    Some(p) => p,
                    None => step::find_file(dir, &["json"], None)?,
                };
                parts.push((name.clone(), step::read_json(&path)?));
            }
            step::write_file(&dest.join("joined.json"), json::to_pretty(&ops::merge_json(parts)))?;
            eprintln!("csv-join: {} JSON inputs merged", names.len());
            step::metrics(&[("inputs", names.len() as f64, None)])
        }
    })
}
