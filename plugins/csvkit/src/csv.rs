//! CSV through the `csv` crate: comma-separated, `"`-quoted fields that may contain
//! commas, newlines and doubled quotes; LF or CRLF line ends; a header row.

/// A CSV file: a header row and rows of the same width.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: Vec<String>) -> Self {
        Table { header, rows: Vec::new() }
    }

    /// Index of a column, or an error naming the available columns.
    pub fn col(&self, name: &str) -> Result<usize, String> {
        self.header.iter().position(|h| h == name).ok_or_else(|| {
            format!("unknown column {name:?} (columns: {})", self.header.join(", "))
        })
    }

    pub fn cols(&self, names: &[String]) -> Result<Vec<usize>, String> {
        names.iter().map(|n| self.col(n)).collect()
    }
}

/// Parses CSV text with a header row (a leading byte-order mark and blank lines are
/// skipped). Every row must have as many fields as the header.
pub fn parse(text: &str) -> Result<Table, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    check_quotes(text)?;
    let mut records = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes())
        .into_records();
    let fields = |r: &csv::StringRecord| r.iter().map(String::from).collect::<Vec<_>>();
    let header = match records.next() {
        None => return Err("the file is empty (expected a header row)".to_string()),
        Some(r) => fields(&r.map_err(|e| e.to_string())?),
    };
    for (i, h) in header.iter().enumerate() {
        if header[..i].contains(h) {
            return Err(format!("line 1: duplicate column name {h:?}"));
        }
    }
    let mut t = Table::new(header);
    for r in records {
        let r = r.map_err(|e| e.to_string())?;
        if r.len() != t.header.len() {
            let line = r.position().map_or(0, |p| p.line());
            return Err(format!(
                "line {line}: expected {} fields (as in the header), found {}",
                t.header.len(),
                r.len()
            ));
        }
        t.rows.push(fields(&r));
    }
    Ok(t)
}

/// The csv crate reads a stray quote leniently (an unterminated quoted field runs to the
/// end of the file, text after a closing quote is appended); here a quoted field must end
/// at its closing quote and a quote inside it must be doubled, as RFC 4180 says.
fn check_quotes(text: &str) -> Result<(), String> {
    let b = text.as_bytes();
    let (mut i, mut line, mut record_line, mut field_start) = (0, 1, 1, true);
    while let Some(&c) = b.get(i) {
        i += 1;
        match c {
            b'"' if field_start => {
                loop {
                    match b.get(i) {
                        None => return Err(format!("line {record_line}: unterminated quoted field")),
                        Some(b'"') if b.get(i + 1) == Some(&b'"') => i += 2,
                        Some(b'"') => break,
                        Some(c) => {
                            line += usize::from(*c == b'\n');
                            i += 1;
                        }
                    }
                }
                i += 1;
                if !matches!(b.get(i), None | Some(b',' | b'\n' | b'\r')) {
                    return Err(format!(
                        "line {line}: unexpected text after a closing quote (a quote inside a quoted field must be doubled: \"\")"
                    ));
                }
                field_start = false;
            }
            b',' | b'\r' => field_start = true,
            b'\n' => {
                line += 1;
                record_line = line;
                field_start = true;
            }
            _ => field_start = false,
        }
    }
    Ok(())
}

/// Serialises a table (LF line ends, fields quoted only when they have to be).
pub fn write(t: &Table) -> String {
    let mut w = csv::WriterBuilder::new().terminator(csv::Terminator::Any(b'\n')).from_writer(Vec::new());
    for r in std::iter::once(&t.header).chain(&t.rows) {
        w.write_record(r).expect("a table's rows have the header's width");
    }
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_fields() {
        let t = parse("a,b,c\r\n1,\"x, y\",\"say \"\"hi\"\"\"\r\n\"multi\nline\",,3\n").unwrap();
        assert_eq!(t.header, vec!["a", "b", "c"]);
        assert_eq!(t.rows[0], vec!["1", "x, y", "say \"hi\""]);
        assert_eq!(t.rows[1], vec!["multi\nline", "", "3"]);
    }

    #[test]
    fn roundtrip() {
        let src = "name,note\n\"a,b\",\"q\"\"q\"\nplain,\"l1\nl2\"\nx,\n";
        let t = parse(src).unwrap();
        assert_eq!(write(&t), src);
        assert_eq!(parse(&write(&t)).unwrap(), t);
    }

    #[test]
    fn single_empty_column_roundtrip() {
        let t = Table { header: vec!["a".into()], rows: vec![vec!["".into()], vec!["1".into()]] };
        assert_eq!(parse(&write(&t)).unwrap(), t);
    }

    #[test]
    fn blank_lines_bom_and_no_final_newline() {
        let t = parse("\u{feff}a,b\n\n1,2\n\n3,4").unwrap();
        assert_eq!(t.header, vec!["a", "b"]);
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[1], vec!["3", "4"]);
    }

    #[test]
    fn errors_have_line_numbers() {
        assert_eq!(parse("a,b\n1,2\n3\n").unwrap_err(), "line 3: expected 2 fields (as in the header), found 1");
        assert!(parse("a\n\"open\n").unwrap_err().contains("unterminated"));
        assert!(parse("a,b\n\"x\"y,2\n").unwrap_err().contains("line 2"));
        assert!(parse("").unwrap_err().contains("empty"));
        assert!(parse("a,a\n").unwrap_err().contains("duplicate"));
        assert_eq!(parse("a\n\"x\ny\n").unwrap_err(), "line 2: unterminated quoted field");
        assert_eq!(parse("a,b\n\n1,\"x\ny\"z\n").unwrap_err(), "line 4: unexpected text after a closing quote (a quote inside a quoted field must be doubled: \"\")");
        assert_eq!(parse("a,b\n\"q\nq\",1\n3\n").unwrap_err(), "line 4: expected 2 fields (as in the header), found 1");
    }

    #[test]
    fn quotes_inside_unquoted_fields_and_crlf() {
        let t = parse("a,b\r\nx\"y, \"z\"\r\n\"\"\"\",\"\"\r\n").unwrap();
        assert_eq!(t.rows, vec![vec!["x\"y", " \"z\""], vec!["\"", ""]]);
        assert_eq!(write(&t), "a,b\n\"x\"\"y\",\" \"\"z\"\"\"\n\"\"\"\",\n");
        assert_eq!(write(&Table::new(vec!["".into()])), "\"\"\n");
    }

    #[test]
    fn unknown_column_lists_columns() {
        let t = parse("x,y\n").unwrap();
        assert_eq!(t.col("z").unwrap_err(), "unknown column \"z\" (columns: x, y)");
    }
}
