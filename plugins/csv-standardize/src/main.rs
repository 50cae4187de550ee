//! csv-standardize: z-scores of numeric columns.

use csvkit::args::{self, Long, once};
use csvkit::{Error, csv, json, ops, step};

const USAGE: &str = "\
csv-standardize: replace numeric values by z-scores (x - mean) / std (sample std)

usage: csv-standardize [--input NAME] [--file FILE] [--output NAME] [--columns COL,...]

  --input NAME    input directory /in/NAME (default: data, else the only input)
  --file FILE     file to read in it (default: the only *.csv file in it)
  --output NAME   writes /out/NAME/data.csv and /out/NAME/params.json (default: features)
  --columns COLS  standardise these columns (each must be numeric); default: every
                  column whose non-empty cells are all numbers

Other columns and empty cells are kept as they are; a constant column becomes 0.
params.json: {\"rows\": N, \"columns\": {COL: {\"mean\": M, \"std\": S}}}.
Metrics: rows, columns (how many were standardised).";

fn main() {
    csvkit::run("csv-standardize", USAGE, |p| {
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
        let output = once("output", output)?.unwrap_or_else(|| "features".into());
        let columns = args::list("columns", columns)?;

        let dir = step::input_dir(input.as_deref(), "data")?;
        let path = step::find_file(&dir, &["csv"], file.as_deref())?;
        let table = step::read_csv(&path)?;
        let (out, params) = ops::standardize(table, columns.as_deref())
            .map_err(|e| Error::fail(format!("{}: {e}", path.display())))?;
        let ncols = params.columns.0.len();
        let dest = step::output_dir(&output)?;
        step::write_file(&dest.join("data.csv"), csv::write(&out))?;
        step::write_file(&dest.join("params.json"), json::to_pretty(&params))?;
        eprintln!("csv-standardize: {}: {} rows, {ncols} columns standardised", path.display(), out.rows.len());
        step::metrics(&[("rows", out.rows.len() as f64, None), ("columns", ncols as f64, None)])
    })
}
