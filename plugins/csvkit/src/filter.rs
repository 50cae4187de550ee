//! Row filters: `column OP value` with OP one of `>` `>=` `<` `<=` `==` (or `=`) `!=`.
//! Compares as numbers when both sides are numbers, else as strings.

use crate::stats::parse_num;
use std::cmp::Ordering;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub column: String,
    pub op: Op,
    pub value: String,
}

impl Filter {
    /// Parses `col>value`. Spaces around the parts are ignored; the value may be quoted
    /// with `"` or `'`. The column is everything before the first `<`, `>`, `=` or `!`.
    pub fn parse(expr: &str) -> Result<Filter, String> {
        let bad = || format!("bad filter {expr:?}: expected COLUMN OP VALUE with OP one of > >= < <= == !=");
        let pos = expr.find(['<', '>', '=', '!']).ok_or_else(bad)?;
        let (column, rest) = expr.split_at(pos);
        let (op, len) = match rest.as_bytes() {
            [b'>', b'=', ..] => (Op::Ge, 2),
            [b'<', b'=', ..] => (Op::Le, 2),
            [b'=', b'=', ..] => (Op::Eq, 2),
            [b'!', b'=', ..] => (Op::Ne, 2),
            [b'>', ..] => (Op::Gt, 1),
            [b'<', ..] => (Op::Lt, 1),
            [b'=', ..] => (Op::Eq, 1),
            _ => return Err(bad()),
        };
        let column = column.trim();
        if column.is_empty() {
            return Err(bad());
        }
        let mut value = rest[len..].trim();
        for q in ['"', '\''] {
            if value.len() >= 2 && value.starts_with(q) && value.ends_with(q) {
                value = &value[1..value.len() - 1];
                break;
            }
        }
        Ok(Filter { column: column.to_string(), op, value: value.to_string() })
    }

    /// Whether a cell passes.
    pub fn matches(&self, cell: &str) -> bool {
        let ord = match (parse_num(cell), parse_num(&self.value)) {
            (Some(a), Some(b)) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
            _ => cell.trim().cmp(self.value.as_str()),
        };
        match self.op {
            Op::Gt => ord == Ordering::Greater,
            Op::Ge => ord != Ordering::Less,
            Op::Lt => ord == Ordering::Less,
            Op::Le => ord != Ordering::Greater,
            Op::Eq => ord == Ordering::Equal,
            Op::Ne => ord != Ordering::Equal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        let f = Filter::parse(" alcohol >= 13.5 ").unwrap();
        assert_eq!((f.column.as_str(), f.op, f.value.as_str()), ("alcohol", Op::Ge, "13.5"));
        assert_eq!(Filter::parse("a!=x").unwrap().op, Op::Ne);
        assert_eq!(Filter::parse("a=x").unwrap().op, Op::Eq);
        assert_eq!(Filter::parse("class=='class_0'").unwrap().value, "class_0");
        assert_eq!(Filter::parse("a<").unwrap().value, "");
        assert!(Filter::parse("abc").is_err());
        assert!(Filter::parse(">3").is_err());
        assert!(Filter::parse("a!3").is_err());
    }

    #[test]
    fn numeric_vs_string() {
        let gt = Filter::parse("x>9").unwrap();
        assert!(gt.matches("10")); // numeric: 10 > 9
        assert!(!gt.matches("8.5"));
        assert!(gt.matches("abc")); // string: "abc" > "9"
        assert!(Filter::parse("x==1").unwrap().matches("1.0"));
        assert!(Filter::parse("x!=b").unwrap().matches("a"));
        assert!(Filter::parse("x<=2").unwrap().matches("2"));
        assert!(Filter::parse("x<2").unwrap().matches("-3e1"));
        assert!(Filter::parse("x==").unwrap().matches(" "));
    }
}
