use super::*;

#[test]
fn param_values_with_control_characters_are_refused() {
    assert!(check_param_value("p", "a\tb\nc é").is_ok());
    let e = check_param_value("p", "ab\0c").unwrap_err();
    assert!(e.contains("U+0000 at byte 2"), "{e}");
    assert!(check_param_value("p", "\u{1b}[2J").is_err());
    assert!(check_param_value("p", "x\r").is_err());
    assert!(check_param_value("p", "\u{9b}").is_err());
}

#[test]
fn interpolation_splits_params_and_escapes() {
    assert_eq!(
        interpolation_pieces("a${params.x}b$${c}"),
        vec![
            Piece::Literal("a"),
            Piece::Param { name: "x", at: 1 },
            Piece::Literal("b"),
            Piece::Literal("${"),
            Piece::Literal("c}")
        ]
    );
    let get = |n: &str| (n == "x").then(|| "7".to_string());
    assert_eq!(interpolate("--n=${params.x}", &get), "--n=7");
    assert!(matches!(
        interpolation_pieces("${env.x}")[0],
        Piece::Bad { .. }
    ));
}

#[test]
fn interpolation_of_non_ascii_text() {
    assert_eq!(interpolation_pieces("café"), vec![Piece::Literal("café")]);
    assert_eq!(
        interpolation_pieces("日本${params.é}ü$${é}$"),
        vec![
            Piece::Literal("日本"),
            Piece::Param { name: "é", at: 6 },
            Piece::Literal("ü"),
            Piece::Literal("${"),
            Piece::Literal("é}$"),
        ]
    );
    assert!(matches!(
        interpolation_pieces("é${é")[1],
        Piece::Bad {
            text: "${é", at: 2
        }
    ));
    let get = |n: &str| (n == "é").then(|| "ça".to_string());
    assert_eq!(interpolate("→${params.é}←", &get), "→ça←");
}

fn check(text: &str) -> String {
    let (_, r) = crate::graph::parse(
        Path::new("/nowhere/p.toml"),
        text.into(),
        &Environment::default(),
    );
    r.to_string()
}

#[test]
fn an_interpolation_error_points_into_the_string_as_written() {
    let step = "[[step]]\nname = \"a\"\ntransfer = { from = \"inputs.x\", to = \"y\" }\n[inputs.x]\npath = \"x\"\n[[step]]\nname = \"b\"\nwasm = \"b.wasm\"\n";
    // As written: the caret is under `${params.y}`.
    let out = check(&format!("{step}args = [\"é ${{params.y}}\"]\n"));
    assert!(
        out.contains("p.toml:9:12: error: unknown param `y`"),
        "{out}"
    );
    // An escape before it shifts the offsets: the whole string is marked.
    let out = check(&format!("{step}args = [\"\\u00e9 ${{params.y}}\"]\n"));
    assert!(
        out.contains("p.toml:9:9: error: unknown param `y`"),
        "{out}"
    );
    let out = check(&format!("{step}args = [\"\"\"\né ${{params.y}}\"\"\"]\n"));
    assert!(
        out.contains("p.toml:9:9: error: unknown param `y`"),
        "{out}"
    );
}

#[test]
fn out_of_range_numbers_and_timers_are_errors() {
    let step = "[[step]]\nname = \"a\"\nwasm = \"a.wasm\"\n";
    let out = check(&format!(
        "{step}retries = {{ attempts = 99999999999999999999 }}\n"
    ));
    assert!(
        out.contains("p.toml:4:24: error: retries.attempts: integer out of range"),
        "{out}"
    );
    let out = check(&format!("{step}retries = {{ backoff = \"1000000y\" }}\n"));
    assert!(
        out.contains("p.toml:4:23: error: retries.backoff must be at most a year"),
        "{out}"
    );
    let out = check(&format!(
        "[[trigger]]\nwatch = \"*.csv\"\ndebounce = \"400y\"\n{step}"
    ));
    assert!(
        out.contains("p.toml:3:12: error: debounce must be at most a year"),
        "{out}"
    );
}

#[test]
fn sizes_and_durations_of_non_ascii_text_are_errors() {
    for s in [
        "12 é",
        "１２MiB",
        "1.5Mé",
        "é",
        "1e30GiB",
        "99999999999999999999999TiB",
    ] {
        assert!(parse_size(s).is_err(), "{s}");
    }
    for s in [
        "1é",
        "é1s",
        "1 ｓ",
        "99999999999999999999999999s",
        "584942417355y",
    ] {
        assert!(parse_duration(s).is_err(), "{s}");
    }
    assert_eq!(parse_duration("5 µs"), Ok(Duration::from_micros(5)));
}

/// The `toml` parser bounds nesting itself (80 levels); this holds it to that
/// on a small stack, so an upgrade that drops the bound fails here first.
#[test]
fn deep_nesting_is_a_located_error_not_a_stack_overflow() {
    let cases = [
        format!("a = {}1", "[".repeat(100_000)),
        format!("a = {}1{}", "{x=".repeat(100_000), "}".repeat(100_000)),
        format!("[{}a]", "a.".repeat(100_000)),
        format!("{}a = 1", "a.".repeat(100_000)),
    ];
    for text in cases {
        let out = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || check(&text))
            .unwrap()
            .join()
            .unwrap();
        assert!(
            out.contains("p.toml:1:"),
            "{}",
            out.chars().take(2000).collect::<String>()
        );
        assert!(
            out.contains("error: invalid TOML"),
            "{}",
            out.chars().take(2000).collect::<String>()
        );
    }
}

#[test]
fn a_watch_glob_is_bounded_before_it_is_compiled() {
    let step = "[[step]]\nname = \"a\"\nwasm = \"a.wasm\"\n";
    let glob = |g: &str| check(&format!("[[trigger]]\nwatch = \"{g}\"\n{step}"));
    let out = glob(&format!("inbox/*{}.csv", "$".repeat(1 << 20)));
    assert!(
        out.contains(
            "p.toml:2:9: error: the watch glob has 1048587 characters, more than the limit of 1024"
        ),
        "{}",
        out.chars().take(1000).collect::<String>()
    );
    // The worst globs within the limit compile (or are refused) without a panic.
    for g in [
        "$".repeat(1024),
        "*".repeat(1024),
        "?".repeat(1024),
        "**/".repeat(341),
        "[a-z]".repeat(204),
        "{a,".repeat(341),
        format!("{}{}", "{a,".repeat(170), "}".repeat(170)),
        "[!a-z0-9]".repeat(113),
        "[\u{80}-\u{10FFFF}]".repeat(204),
        "[!\u{80}-\u{10FFFF}]*".repeat(146),
    ] {
        assert!(g.chars().count() <= MAX_GLOB_CHARS);
        let _ = glob(&g);
    }
}

#[test]
fn sizes_and_durations() {
    assert_eq!(parse_size("512MiB"), Ok(512 << 20));
    assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
    assert!(parse_size("12 parsecs").is_err());
    assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
    assert!(parse_duration("soon").is_err());
    assert_eq!(format_size(2 << 30), "2GiB");
}

#[test]
fn float_params_keep_their_decimal_point() {
    assert_eq!(ParamValue::Float(1.0).to_string(), "1.0");
    assert_eq!(
        ParamValue::Float(0.5).parse_like("0.7"),
        Ok(ParamValue::Float(0.7))
    );
    assert!(ParamValue::Integer(1).parse_like("x").is_err());
}

#[test]
fn a_watch_glob_resolves_with_its_triggers_params_over_the_defaults() {
    let text = "[params]\nday = \"d0\"\n[[trigger]]\nwatch = \"inbox/${params.day}/*.csv\"\n[[trigger]]\nwatch = \"inbox/${params.day}/*.csv\"\nparams = { day = \"d1\" }\n[[step]]\nname = \"a\"\ntransfer = { from = \"inputs.x\", to = \"y\" }\n[inputs.x]\npath = \"x\"\n";
    let (p, r) = crate::graph::parse(
        Path::new("/nowhere/p.toml"),
        text.into(),
        &Environment::default(),
    );
    let p = p.unwrap_or_else(|| panic!("{r}"));
    let globs: Vec<&str> = p
        .triggers
        .iter()
        .map(|t| match &t.kind {
            TriggerKind::Watch { glob, .. } => glob.get_ref().as_str(),
            _ => "",
        })
        .collect();
    assert_eq!(globs, ["inbox/d0/*.csv", "inbox/d1/*.csv"]);
    // An unknown param in a glob is located like any other.
    let out = check(&text.replace(
        "${params.day}/*.csv\"\n[[trigger]]",
        "${params.dy}/*.csv\"\n[[trigger]]",
    ));
    assert!(
        out.contains("p.toml:4:16: error: unknown param `dy`"),
        "{out}"
    );
}
