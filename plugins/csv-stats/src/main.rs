//! csv-stats: descriptive statistics of the numeric columns of a CSV file.

use csvkit::args::{self, Long, once};
use csvkit::{Error, ops, step};

const USAGE: &str = "\
csv-stats: count, mean, std (sample), min, max and median of numeric columns

usage: csv-stats [--input NAME] [--file FILE] [--output NAME] [--columns COL,...]

  --input NAME    input directory /in/NAME (default: data, else the only input)
  --file FILE     file to read in it (default: the only *.csv file in it)
  --output NAME   writes /out/NAME/stats.json (default: stats)
  --columns COLS  these columns (each must be numeric; empty cells are skipped);
                  default: every column whose non-empty cells are all numbers

stats.json: {\"rows\": N, \"columns\": {COL: {\"count\", \"mean\", \"std\", \"min\",
\"max\", \"median\"}}, \"non_numeric\": [COL...]}. Metrics: rows, <COL>.mean per column.";

fn main() {
    csvkit::run("csv-stats", USAGE, |p| {
        let (mut input, mut file, mut output, mut columns) = (vec![], vec![], vec![], vec![]);
        while let Some(arg) = p.next()? {
            match arg {
                Long("input") => input.push(args::value(p, "input")?),
                Long("file") => file.push(args::value(p, "file")?),
                Long("output") => output.push(args::value(p, "output")?),
                Long("columns") => columns.push(args::value(p, "columns")?),
                arg => return Err(arg.unexpected().into()),
            }
        }
        let (input, file) = (once("input", input)?, once("file", file)?);
        let output = once("output", output)?.unwrap_or_else(|| "stats".into());
        let columns = args::list("columns", columns)?;

        let dir = step::input_dir(input.as_deref(), "data")?;
        let path = step::find_file(&dir, &["csv"], file.as_deref())?;
        let table = step::read_csv(&path)?;
        let (json, means) =
            ops::stats(&table, columns.as_deref()).map_err(|e| Error::fail(format!("{}: {e}", path.display())))?;
        step::write_file(&step::output_dir(&output)?.join("stats.json"), csvkit::json::to_pretty(&json))?;
        eprintln!("csv-stats: {}: {} rows, {} numeric columns", path.display(), table.rows.len(), means.len());
        let mut m: Vec<(&str, f64, Option<u64>)> = vec![("rows", table.rows.len() as f64, None)];
        m.extend(means.iter().map(|(n, v)| (n.as_str(), *v, None)));
        step::metrics(&m)
    })
}
