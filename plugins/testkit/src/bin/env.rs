//! env: dumps its environment and arguments, and writes a few metrics.

use csvkit::args::{self, Long, once};
use csvkit::step;

const USAGE: &str = "\
env: write every environment variable (NAME=value) and argument (argv[NN]=value)
to /out/NAME/env.txt, one per line, sorted, and print them to stdout; append the
metrics {\"name\":\"answer\",\"value\":42} and a curve loss = 1/(i+1), step i, i in 0..5

usage: env [--out NAME] [ANY OTHER ARGS...]

  --out NAME  output directory (default: out)";

fn main() {
    csvkit::run("env", USAGE, |p| {
        let mut out = vec![];
        while let Some(arg) = p.next()? {
            match arg {
                Long("out") => out.push(args::value(p, "out")?),
                // Anything else is accepted and ignored.
                Long(_) => _ = p.optional_value(),
                _ => {}
            }
        }
        let out = once("out", out)?.unwrap_or_else(|| "out".into());
        let mut lines: Vec<String> = std::env::vars_os()
            .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
            .collect();
        lines.extend(std::env::args_os().enumerate().map(|(i, a)| format!("argv[{i:02}]={}", a.to_string_lossy())));
        lines.sort();
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        print!("{text}");
        step::write_file(&step::output_dir(&out)?.join("env.txt"), &text)?;
        let mut m: Vec<(&str, f64, Option<u64>)> = vec![("answer", 42.0, None)];
        m.extend((0..5u64).map(|i| ("loss", 1.0 / (i + 1) as f64, Some(i))));
        step::metrics(&m)
    })
}
