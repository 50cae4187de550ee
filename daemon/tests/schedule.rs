//! `millrace schedule`: the next firings from now, and with `--simulate` a window
//! listed from its start.

use crate::common::{Project, plugin};

fn nightly(p: &Project) -> String {
    let noop = plugin("noop");
    let f = p.write(
        "nightly.toml",
        &format!(
            r#"
[[trigger]]
cron = "0 3 * * *"
[[step]]
name = "a"
wasm = "{noop}"
"#
        ),
    );
    f.to_str().unwrap().to_string()
}

#[test]
fn the_next_firings_are_the_coming_ones() {
    let p = Project::new();
    let f = nightly(&p);
    let now = chrono::Utc::now();
    let out = p.json(&["schedule", &f, "--count", "3"]);
    let utc: Vec<chrono::DateTime<chrono::Utc>> = out[0]["utc"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(utc.len(), 3, "{out}");
    assert!(utc[0] > now, "{out}");
    assert!(
        utc[2] - now <= chrono::TimeDelta::days(3),
        "a daily schedule's third next firing is within three days: {out}"
    );
    assert_eq!(out[0]["total"], 3, "{out}");
}

#[test]
fn a_simulated_window_is_listed_from_its_start_and_a_reversed_one_is_refused() {
    let p = Project::new();
    let f = nightly(&p);
    let text = p.run(&[
        "schedule",
        &f,
        "--simulate",
        "2026-12-01",
        "2026-12-31T23:00",
        "--count",
        "2",
    ]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    let listed: Vec<&str> = text.lines().filter(|l| l.starts_with("  2026")).collect();
    assert_eq!(listed.len(), 2, "{text}");
    assert!(
        listed[0].starts_with("  2026-12-01T03:00:00+00:00"),
        "{text}"
    );
    assert!(
        listed[1].starts_with("  2026-12-02T03:00:00+00:00"),
        "{text}"
    );
    assert!(text.contains("  … 29 more"), "{text}");

    let reversed = p.run(&["schedule", &f, "--simulate", "2026-12-31", "2026-12-01"]);
    assert_eq!(reversed.status.code(), Some(2));
    let err = String::from_utf8_lossy(&reversed.stderr);
    assert!(err.contains("the window ends before it starts"), "{err}");
}
