//! JSON through `serde_json` (features `preserve_order`: objects keep their key order;
//! `arbitrary_precision`: a number keeps its digits, so merging files never rounds one;
//! serde_json does write an exponent read from a file as `e+N`/`e-N`, so `1E3` comes out
//! as `1e+3`). The plugins' own numbers are `Num`s, written as `fmt_num` writes them.

use serde::{Serialize, Serializer};
pub use serde_json::{Map, Value, json};

/// A number in the plugins' own output: `fmt_num`'s text (`1`, `0.25`, `1e300`), `null`
/// when missing or not finite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Num(pub Option<f64>);

impl Serialize for Num {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.filter(|v| v.is_finite()) {
            Some(v) => serde_json::value::RawValue::from_string(fmt_num(v))
                .map_err(serde::ser::Error::custom)?
                .serialize(s),
            None => s.serialize_unit(),
        }
    }
}

/// A JSON object with its keys in this order (a name may repeat).
#[derive(Debug, Clone, PartialEq)]
pub struct Ordered<T>(pub Vec<(String, T)>);

impl<T: Serialize> Serialize for Ordered<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// Shortest text that reads back as exactly `v`; plain decimal for ordinary magnitudes,
/// exponent form (`1e300`, `1.5e-9`) otherwise. Valid JSON for finite `v`.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-6..1e16).contains(&a) { format!("{v:e}") } else { format!("{v}") }
}

/// Compact, one line.
pub fn to_compact(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Indented by two spaces, with a final newline.
pub fn to_pretty(v: &impl Serialize) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// Parses a complete JSON text (a leading byte-order mark and surrounding whitespace
/// allowed). Errors read `JSON line L column C: what`.
pub fn parse(text: &str) -> Result<Value, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    serde_json::from_str(text).map_err(|e| {
        let what = e.to_string();
        let what = what.split(" at line ").next().unwrap_or_default();
        format!("JSON line {} column {}: {what}", e.line(), e.column())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let v = parse(r#" {"a": [1, -2.5e3, true, null], "b": {"c": "x\"y\\n\u00e9\ud83d\ude00"}} "#).unwrap();
        assert_eq!(to_compact(&v["a"]), "[1,-2.5e+3,true,null]");
        assert_eq!(v["b"]["c"], "x\"y\\né😀");
        assert_eq!(parse(&to_pretty(&v)).unwrap(), v);
        assert_eq!(parse(&to_compact(&v)).unwrap(), v);
        assert_eq!(to_compact(&json!({"k": []})), r#"{"k":[]}"#);
    }

    #[test]
    fn keeps_key_order_and_number_text() {
        let src = "{\n  \"z\": 1.50,\n  \"a\": [\n    1e-7,\n    -0,\n    123456789012345678901234567890\n  ],\n  \"m\": {},\n  \"e\": []\n}\n";
        assert_eq!(to_pretty(&parse(src).unwrap()), src);
        assert_eq!(to_compact(&parse("[1E3, 2e5, 3e+1]").unwrap()), "[1e+3,2e+5,3e+1]");
        assert_eq!(to_compact(&parse("\u{feff} {\"s\":\"\\u0001\\t\\/\"}").unwrap()), r#"{"s":"\u0001\t/"}"#);
    }

    #[test]
    fn rejects_bad_json() {
        for bad in ["", "{", "[1,]", "{\"a\" 1}", "01", "1.", "tru", "\"a", "{} x", "-", "\"\t\"", "\"\\ud800\""] {
            assert!(parse(bad).is_err(), "{bad:?} should fail");
        }
        assert_eq!(parse("{\"a\" 1}").unwrap_err(), "JSON line 1 column 6: expected `:`");
        assert!(parse(&"[".repeat(1000)).unwrap_err().contains("recursion limit"));
    }

    #[test]
    fn own_numbers_keep_their_text() {
        let o = Ordered(vec![("a".into(), Num(Some(1e300))), ("b".into(), Num(None)), ("a".into(), Num(Some(2.0)))]);
        assert_eq!(to_compact(&o), r#"{"a":1e300,"b":null,"a":2}"#);
        assert_eq!(to_pretty(&json!([])), "[]\n");
        assert_eq!(to_compact(&Num(Some(f64::NAN))), "null");
        assert_eq!(to_compact(&Num(Some(-1.5e-9))), "-1.5e-9");
    }

    #[test]
    fn numbers() {
        let n = |v| to_compact(&Num(Some(v)));
        assert_eq!((n(1.0), n(0.25), n(1e300), n(f64::INFINITY)), ("1".into(), "0.25".into(), "1e300".into(), "null".into()));
        for v in [1e300, -1.5e-9, 123.456, 0.0, 1e16, 9.99e15] {
            assert_eq!(parse(&n(v)).unwrap().as_f64(), Some(v));
        }
    }
}
