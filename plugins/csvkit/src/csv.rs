//! A small RFC 4180 CSV reader and writer: comma-separated, `"`-quoted fields that may
//! contain commas, newlines and doubled quotes; LF or CRLF line ends; a header row.

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

/// Splits CSV text into records (no header handling). Each record comes with the
/// 1-based line number it starts on. Blank lines are skipped.
pub fn records(text: &str) -> Result<Vec<(usize, Vec<String>)>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1;
    while i < b.len() {
        let start_line = line;
        // A blank line (LF or CRLF) is not a record.
        if b[i] == b'\n' {
            i += 1;
            line += 1;
            continue;
        }
        if b[i] == b'\r' && b.get(i + 1) == Some(&b'\n') {
            i += 2;
            line += 1;
            continue;
        }
        let mut rec = Vec::new();
        loop {
            // One field starts at i.
            let mut field = String::new();
            if b.get(i) == Some(&b'"') {
                i += 1;
                let mut seg = i;
                loop {
                    match b.get(i) {
                        None => return Err(format!("line {start_line}: unterminated quoted field")),
                        Some(b'"') if b.get(i + 1) == Some(&b'"') => {
                            field.push_str(&text[seg..=i]);
                            i += 2;
                            seg = i;
                        }
                        Some(b'"') => {
                            field.push_str(&text[seg..i]);
                            i += 1;
                            break;
                        }
                        Some(b'\n') => {
                            line += 1;
                            i += 1;
                        }
                        Some(_) => i += 1,
                    }
                }
                match b.get(i) {
                    None | Some(b',') | Some(b'\n') => {}
                    Some(b'\r') if matches!(b.get(i + 1), None | Some(b'\n')) => {}
                    Some(_) => {
                        return Err(format!(
                            "line {line}: unexpected text after a closing quote (a quote inside a quoted field must be doubled: \"\")"
                        ));
                    }
                }
            } else {
                let seg = i;
                while let Some(&c) = b.get(i) {
                    if c == b',' || c == b'\n' || (c == b'\r' && matches!(b.get(i + 1), None | Some(b'\n'))) {
                        break;
                    }
                    i += 1;
                }
                field.push_str(&text[seg..i]);
            }
            rec.push(field);
            match b.get(i) {
                Some(b',') => {
                    i += 1;
                }
                Some(b'\r') => {
                    i += if b.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                    line += 1;
                    break;
                }
                Some(b'\n') => {
                    i += 1;
                    line += 1;
                    break;
                }
                _ => break, // end of input
            }
        }
        out.push((start_line, rec));
    }
    Ok(out)
}

/// Parses CSV text with a header row. Every row must have as many fields as the header.
pub fn parse(text: &str) -> Result<Table, String> {
    let mut recs = records(text)?.into_iter();
    let Some((_, header)) = recs.next() else {
        return Err("the file is empty (expected a header row)".to_string());
    };
    for (i, h) in header.iter().enumerate() {
        if header[..i].contains(h) {
            return Err(format!("line 1: duplicate column name {h:?}"));
        }
    }
    let mut t = Table::new(header);
    for (line, rec) in recs {
        if rec.len() != t.header.len() {
            return Err(format!(
                "line {line}: expected {} fields (as in the header), found {}",
                t.header.len(),
                rec.len()
            ));
        }
        t.rows.push(rec);
    }
    Ok(t)
}

/// Appends one field, quoted if it has to be.
pub fn write_field(out: &mut String, f: &str) {
    if f.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&f.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(f);
    }
}

pub fn write_record<S: AsRef<str>>(out: &mut String, rec: &[S]) {
    for (i, f) in rec.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_field(out, f.as_ref());
    }
    // A record with one empty field would read back as a blank line.
    if rec.len() == 1 && rec[0].as_ref().is_empty() {
        out.push_str("\"\"");
    }
    out.push('\n');
}

/// Serialises a table (LF line ends, minimal quoting).
pub fn write(t: &Table) -> String {
    let mut out = String::new();
    write_record(&mut out, &t.header);
    for r in &t.rows {
        write_record(&mut out, r);
    }
    out
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
    }

    #[test]
    fn unknown_column_lists_columns() {
        let t = parse("x,y\n").unwrap();
        assert_eq!(t.col("z").unwrap_err(), "unknown column \"z\" (columns: x, y)");
    }
}
