//! csv-stats: descriptive statistics of the numeric columns of a CSV file.

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
    csvkit::run("csv-stats", USAGE, |args| {
        let input = args.opt("input")?;
        let file = args.opt("file")?;
        let output = args.opt_or("output", "stats")?;
        let columns = args.list("columns")?;
        args.finish()?;

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
