//! csv-clean: filter, select and shard the rows of a CSV file.

use csvkit::args::{self, Long, once};
use csvkit::filter::Filter;
use csvkit::ops::{CleanOpts, Shard, clean};
use csvkit::{Error, csv, step};

const USAGE: &str = "\
csv-clean: filter, select and shard the rows of a CSV file

usage: csv-clean [--input NAME] [--file FILE] [--output NAME] [--select COL,...]
                 [--drop-na] [--filter EXPR]... [--shard I/N] [--min-rows N]

  --input NAME   input directory /in/NAME (default: data, else the only input)
  --file FILE    file to read in it (default: the only *.csv file in it)
  --output NAME  writes /out/NAME/data.csv (default: clean)
  --select COLS  keep only these columns, in this order (comma-separated)
  --drop-na      drop rows with an empty value in the selected columns
                 (in every column without --select)
  --filter EXPR  keep rows where COLUMN OP VALUE holds, OP one of > >= < <= == !=;
                 numeric comparison when both sides are numbers, else text;
                 repeatable: every filter must hold
  --shard I/N    keep only block I (1-based) of N contiguous, near-equal blocks of
                 the remaining rows (for fan-out; shards 1..N together = all rows)
  --min-rows N   fail if fewer than N rows remain (default: 0)

Order: filter, drop-na, shard, select, min-rows. Metrics: rows_in, rows_out.";

fn main() {
    csvkit::run("csv-clean", USAGE, |p| {
        let (mut input, mut file, mut output, mut select, mut filters, mut shard, mut min_rows) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut drop_na = false;
        while let Some(arg) = p.next()? {
            match arg {
                Long("input") => input.push(args::value(p, "input")?),
                Long("file") => file.push(args::value(p, "file")?),
                Long("output") => output.push(args::value(p, "output")?),
                Long("select") => select.push(args::value(p, "select")?),
                Long("drop-na") => drop_na = args::flag(p, "drop-na")?,
                Long("filter") => filters.push(Filter::parse(&args::value(p, "filter")?).map_err(Error::usage)?),
                Long("shard") => shard.push(args::value(p, "shard")?),
                Long("min-rows") => min_rows.push(args::value(p, "min-rows")?),
                arg => return Err(arg.unexpected().into()),
            }
        }
        let (input, file) = (once("input", input)?, once("file", file)?);
        let output = once("output", output)?.unwrap_or_else(|| "clean".into());
        let select = args::list("select", select)?;
        let shard = once("shard", shard)?.map(|s| Shard::parse(&s).map_err(Error::usage)).transpose()?;
        let min_rows: usize = args::number("min-rows", min_rows, 0)?;

        let dir = step::input_dir(input.as_deref(), "data")?;
        let path = step::find_file(&dir, &["csv"], file.as_deref())?;
        let table = step::read_csv(&path)?;
        let rows_in = table.rows.len();
        let out = clean(table, &CleanOpts { select, drop_na, filters, shard })
            .map_err(|e| Error::fail(format!("{}: {e}", path.display())))?;
        let rows_out = out.rows.len();
        eprintln!("csv-clean: {}: {rows_in} rows in, {rows_out} rows out", path.display());
        if rows_out < min_rows {
            return Err(Error::fail(format!(
                "only {rows_out} of {rows_in} rows remain, fewer than --min-rows {min_rows}"
            )));
        }
        let dest = step::output_dir(&output)?.join("data.csv");
        step::write_file(&dest, csv::write(&out))?;
        step::metrics(&[("rows_in", rows_in as f64, None), ("rows_out", rows_out as f64, None)])
    })
}
