//! The data operations behind the plugins, as pure functions over tables.

use crate::csv::Table;
use crate::filter::Filter;
use crate::json::{Num, Ordered, Value, fmt_num};
use serde::Serialize;
use crate::stats::{Summary, is_missing, numeric_columns, summarize};

/// Shard `index` (1-based) of `count`: a contiguous block of rows, so concatenating
/// shards 1..=count in order gives back the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Parses `i/n` with 1 <= i <= n.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let bad = || format!("bad shard {s:?}: expected I/N with 1 <= I <= N, e.g. 2/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if index == 0 || count == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// The row range of this shard in a table of `rows` rows (sizes differ by at most one).
    pub fn range(&self, rows: usize) -> std::ops::Range<usize> {
        let at = |k: usize| k * rows / self.count;
        at(self.index - 1)..at(self.index)
    }
}

#[derive(Debug, Clone, Default)]
pub struct CleanOpts {
    /// Keep only these columns, in this order.
    pub select: Option<Vec<String>>,
    /// Drop rows with a missing (empty) value in the selected columns (all if no select).
    pub drop_na: bool,
    /// Keep rows that pass every filter.
    pub filters: Vec<Filter>,
    /// Keep only this shard of the remaining rows.
    pub shard: Option<Shard>,
}

/// filter → drop missing → shard → select.
pub fn clean(t: Table, o: &CleanOpts) -> Result<Table, String> {
    let filters: Vec<(usize, &Filter)> =
        o.filters.iter().map(|f| Ok((t.col(&f.column)?, f))).collect::<Result<_, String>>()?;
    let selected: Vec<usize> = match &o.select {
        Some(names) => {
            for (i, n) in names.iter().enumerate() {
                if names[..i].contains(n) {
                    return Err(format!("column {n:?} selected twice"));
                }
            }
            t.cols(names)?
        }
        None => (0..t.header.len()).collect(),
    };
    let mut rows: Vec<Vec<String>> = t
        .rows
        .into_iter()
        .filter(|r| filters.iter().all(|(c, f)| f.matches(&r[*c])))
        .filter(|r| !o.drop_na || selected.iter().all(|&c| !is_missing(&r[c])))
        .collect();
    if let Some(s) = o.shard {
        let range = s.range(rows.len());
        rows.truncate(range.end);
        rows.drain(..range.start);
    }
    let project = |r: &[String]| selected.iter().map(|&c| r[c].clone()).collect::<Vec<_>>();
    Ok(Table { header: project(&t.header), rows: rows.iter().map(|r| project(r)).collect() })
}

/// `stats.json`: `{"rows": N, "columns": {NAME: {count, mean, std, min, max, median}},
/// "non_numeric": [...]}`.
#[derive(Debug, Serialize)]
pub struct Stats {
    pub rows: usize,
    pub columns: Ordered<ColumnStats>,
    /// The columns that were skipped, only when no columns were named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub non_numeric: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
pub struct ColumnStats {
    pub count: usize,
    pub mean: Num,
    pub std: Num,
    pub min: Num,
    pub max: Num,
    pub median: Num,
}

/// Statistics of the numeric columns (or of `columns`), plus `(NAME.mean, mean)` metrics.
pub fn stats(t: &Table, columns: Option<&[String]>) -> Result<(Stats, Vec<(String, f64)>), String> {
    let cols = numeric_columns(t, columns)?;
    if cols.is_empty() {
        return Err(format!(
            "no numeric column with values among the {} rows (columns: {})",
            t.rows.len(),
            t.header.join(", ")
        ));
    }
    let mut per = Vec::new();
    let mut metrics = Vec::new();
    for (_, name, vals) in &cols {
        let v: Vec<f64> = vals.iter().flatten().copied().collect();
        let s = summarize(&v);
        if let Some(s) = &s {
            metrics.push((format!("{name}.mean"), s.mean));
        }
        let f = |get: fn(&Summary) -> f64| Num(s.as_ref().map(get));
        per.push((
            name.clone(),
            ColumnStats {
                count: v.len(),
                mean: f(|s| s.mean),
                std: Num(s.as_ref().and_then(|s| s.std)),
                min: f(|s| s.min),
                max: f(|s| s.max),
                median: f(|s| s.median),
            },
        ));
    }
    let non_numeric = columns.is_none().then(|| {
        let numeric = |c: usize| cols.iter().any(|(nc, _, _)| *nc == c);
        t.header.iter().enumerate().filter(|(c, _)| !numeric(*c)).map(|(_, h)| h.clone()).collect()
    });
    Ok((Stats { rows: t.rows.len(), columns: Ordered(per), non_numeric }, metrics))
}

/// `params.json`: `{"rows": N, "columns": {NAME: {"mean": m, "std": s}}}`.
#[derive(Debug, Serialize)]
pub struct Params {
    pub rows: usize,
    pub columns: Ordered<ColumnParams>,
}

#[derive(Debug, Serialize)]
pub struct ColumnParams {
    pub mean: Num,
    pub std: Num,
}

/// z-scores `(x - mean) / std` (sample std) of the numeric columns (or of `columns`);
/// missing cells stay empty, other columns are unchanged, a constant column becomes 0.
pub fn standardize(mut t: Table, columns: Option<&[String]>) -> Result<(Table, Params), String> {
    let cols = numeric_columns(&t, columns)?;
    if cols.is_empty() {
        return Err(format!("no numeric column to standardise (columns: {})", t.header.join(", ")));
    }
    let mut params = Vec::new();
    for (c, name, vals) in cols {
        let v: Vec<f64> = vals.iter().flatten().copied().collect();
        let s = summarize(&v);
        let mean = s.as_ref().map(|s| s.mean);
        let std = s.as_ref().and_then(|s| s.std);
        for (row, val) in t.rows.iter_mut().zip(&vals) {
            if let (Some(x), Some(m)) = (val, mean) {
                let z = match std {
                    Some(sd) if sd > 0.0 => (x - m) / sd,
                    _ => 0.0,
                };
                row[c] = fmt_num(z);
            }
        }
        params.push((name, ColumnParams { mean: Num(mean), std: Num(std) }));
    }
    let rows = t.rows.len();
    Ok((t, Params { rows, columns: Ordered(params) }))
}

/// Concatenates tables that have the same columns (a different column order is
/// reordered to the first table's). Each part is named for error messages.
pub fn concat(parts: Vec<(String, Table)>) -> Result<Table, String> {
    let mut it = parts.into_iter();
    let Some((first_name, mut out)) = it.next() else {
        return Err("nothing to concatenate".to_string());
    };
    for (name, t) in it {
        if t.header == out.header {
            out.rows.extend(t.rows);
            continue;
        }
        let mut same_set = t.header.len() == out.header.len();
        let order: Vec<usize> = out
            .header
            .iter()
            .map(|h| t.header.iter().position(|x| x == h).unwrap_or_else(|| {
                same_set = false;
                0
            }))
            .collect();
        if !same_set {
            return Err(format!(
                "cannot concatenate {name:?}: its columns ({}) differ from those of {first_name:?} ({})",
                t.header.join(", "),
                out.header.join(", ")
            ));
        }
        out.rows.extend(t.rows.into_iter().map(|r| order.iter().map(|&c| r[c].clone()).collect()));
    }
    Ok(out)
}

/// `{NAME: value, ...}` in the given order.
pub fn merge_json(parts: Vec<(String, Value)>) -> Value {
    Value::Object(parts.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csv::{parse, write};
    use crate::json::to_compact;

    fn table(s: &str) -> Table {
        parse(s).unwrap()
    }

    #[test]
    fn shards_cover_everything_once() {
        for rows in [0, 1, 3, 4, 5, 178] {
            for count in 1..=6 {
                let mut next = 0;
                for index in 1..=count {
                    let r = Shard { index, count }.range(rows);
                    assert_eq!(r.start, next);
                    assert!(r.len() <= rows / count + 1);
                    next = r.end;
                }
                assert_eq!(next, rows);
            }
        }
        assert_eq!(Shard::parse("2/4").unwrap(), Shard { index: 2, count: 4 });
        for bad in ["0/4", "5/4", "x/4", "1", "1/0"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn clean_pipeline() {
        let t = table("id,x,name\n1,5,a\n2,,b\n3,7,\"c,d\"\n4,9,e\n");
        let o = CleanOpts {
            select: Some(vec!["name".into(), "x".into()]),
            drop_na: true,
            filters: vec![Filter::parse("id>1").unwrap()],
            shard: None,
        };
        let out = clean(t.clone(), &o).unwrap();
        assert_eq!(write(&out), "name,x\n\"c,d\",7\ne,9\n");
        let o = CleanOpts { shard: Some(Shard { index: 2, count: 2 }), ..Default::default() };
        assert_eq!(clean(t.clone(), &o).unwrap().rows.len(), 2);
        let o = CleanOpts { filters: vec![Filter::parse("nope>1").unwrap()], ..Default::default() };
        assert!(clean(t.clone(), &o).unwrap_err().contains("unknown column \"nope\""));
        let o = CleanOpts { select: Some(vec!["zz".into()]), ..Default::default() };
        assert!(clean(t.clone(), &o).is_err());
        // drop-na without select looks at every column
        let o = CleanOpts { drop_na: true, ..Default::default() };
        assert_eq!(clean(t, &o).unwrap().rows.len(), 3);
    }

    #[test]
    fn stats_json() {
        let t = table("a,b,c\n1,x,\n2,y,\n3,z,\n");
        let (j, m) = stats(&t, None).unwrap();
        assert_eq!(
            to_compact(&j),
            r#"{"rows":3,"columns":{"a":{"count":3,"mean":2,"std":1,"min":1,"max":3,"median":2}},"non_numeric":["b","c"]}"#
        );
        assert_eq!(m, vec![("a.mean".to_string(), 2.0)]);
        let (j, _) = stats(&table("a\n1e300\n\n"), Some(&["a".to_string(), "a".to_string()])).unwrap();
        assert_eq!(
            to_compact(&j),
            r#"{"rows":1,"columns":{"a":{"count":1,"mean":1e300,"std":null,"min":1e300,"max":1e300,"median":1e300},"a":{"count":1,"mean":1e300,"std":null,"min":1e300,"max":1e300,"median":1e300}}}"#
        );
        assert!(stats(&table("b\nx\n"), None).unwrap_err().contains("no numeric column"));
        assert!(stats(&t, Some(&["b".to_string()])).unwrap_err().contains("not a number"));
    }

    #[test]
    fn standardize_columns() {
        let t = table("a,b,k\n1,5,x\n2,5,y\n3,,z\n");
        let (out, p) = standardize(t, None).unwrap();
        assert_eq!(write(&out), "a,b,k\n-1,0,x\n0,0,y\n1,,z\n");
        assert_eq!(
            to_compact(&p),
            r#"{"rows":3,"columns":{"a":{"mean":2,"std":1},"b":{"mean":5,"std":0}}}"#
        );
        let (out, _) = standardize(table("a,b\n1,10\n3,30\n"), Some(&["b".to_string()])).unwrap();
        assert_eq!(out.rows[0][0], "1");
        assert!((out.rows[0][1].parse::<f64>().unwrap() + 0.7071067811865475).abs() < 1e-12);
    }

    #[test]
    fn concat_tables() {
        let a = table("x,y\n1,2\n");
        let b = table("y,x\n4,3\n");
        let out = concat(vec![("a".into(), a.clone()), ("b".into(), b)]).unwrap();
        assert_eq!(write(&out), "x,y\n1,2\n3,4\n");
        let c = table("x,z\n1,2\n");
        let err = concat(vec![("a".into(), a), ("c".into(), c)]).unwrap_err();
        assert!(err.contains("differ"), "{err}");
    }
}
