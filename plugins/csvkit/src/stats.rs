//! Descriptive statistics over numeric columns.

use crate::csv::Table;

/// A finite number (surrounding whitespace allowed), else `None`.
/// `NaN`, `inf` and friends are not numbers here.
pub fn parse_num(s: &str) -> Option<f64> {
    let v: f64 = s.trim().parse().ok()?;
    v.is_finite().then_some(v)
}

/// An empty (or all-whitespace) cell: a missing value.
pub fn is_missing(s: &str) -> bool {
    s.trim().is_empty()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    /// Sample standard deviation (n - 1); `None` for fewer than two values.
    pub std: Option<f64>,
    pub min: f64,
    pub max: f64,
    pub median: f64,
}

/// Summary of the values, `None` if there are none.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let std = (n > 1).then(|| {
        let ss: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
        (ss / (n - 1) as f64).sqrt()
    });
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
    Some(Summary { count: n, mean, std, min: sorted[0], max: sorted[n - 1], median })
}

/// The values of column `c`, `None` for missing cells. On the first cell that is not
/// a number, `Err((row index, cell text))`.
pub fn numeric_column(t: &Table, c: usize) -> Result<Vec<Option<f64>>, (usize, String)> {
    t.rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let s = &r[c];
            if is_missing(s) { Ok(None) } else { parse_num(s).map(Some).ok_or_else(|| (i, s.clone())) }
        })
        .collect()
}

/// The columns to treat as numeric: the named ones (every non-missing cell must be a
/// number, else an error naming the row), or else every column whose non-missing cells
/// are all numbers (and that has at least one).
/// Returns (index, name, per-row values).
#[allow(clippy::type_complexity)]
pub fn numeric_columns(t: &Table, names: Option<&[String]>) -> Result<Vec<(usize, String, Vec<Option<f64>>)>, String> {
    let mut out = Vec::new();
    match names {
        Some(names) => {
            for name in names {
                let c = t.col(name)?;
                let vals = numeric_column(t, c).map_err(|(row, text)| {
                    format!("column {name:?}, data row {}: {text:?} is not a number", row + 1)
                })?;
                out.push((c, name.clone(), vals));
            }
        }
        None => {
            for (c, name) in t.header.iter().enumerate() {
                if let Ok(vals) = numeric_column(t, c)
                    && vals.iter().any(Option::is_some)
                {
                    out.push((c, name.clone(), vals));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csv::parse;

    #[test]
    fn summary() {
        let s = summarize(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).unwrap();
        assert_eq!(s.count, 8);
        assert_eq!(s.mean, 5.0);
        assert!((s.std.unwrap() - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert_eq!((s.min, s.max, s.median), (2.0, 9.0, 4.5));
        let one = summarize(&[3.0]).unwrap();
        assert_eq!((one.std, one.median), (None, 3.0));
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[3.0, 1.0, 2.0]).unwrap().median, 2.0);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_num(" 1.5 "), Some(1.5));
        assert_eq!(parse_num("-2e3"), Some(-2000.0));
        assert_eq!(parse_num("NaN"), None);
        assert_eq!(parse_num("inf"), None);
        assert_eq!(parse_num("x"), None);
        assert_eq!(parse_num(""), None);
    }

    #[test]
    fn column_detection() {
        let t = parse("a,b,c,d\n1,x,,2\n2,y,,\n").unwrap();
        let cols = numeric_columns(&t, None).unwrap();
        let names: Vec<_> = cols.iter().map(|c| c.1.as_str()).collect();
        assert_eq!(names, vec!["a", "d"]);
        assert_eq!(cols[1].2, vec![Some(2.0), None]);
        let err = numeric_columns(&t, Some(&["b".to_string()])).unwrap_err();
        assert_eq!(err, "column \"b\", data row 1: \"x\" is not a number");
        assert!(numeric_columns(&t, Some(&["zz".to_string()])).unwrap_err().contains("unknown column"));
    }
}
