//! JSON Schemas of the pipeline file and the daemon config, for editors (taplo,
//! Even Better TOML) and `scripts/test.sh`'s taplo check: `millrace schema
//! pipeline|config`, committed as `docs/schema/*.schema.json`.
//!
//! Which keys each table accepts is not written down here: it is asked of the
//! parser itself. Each table is walked once with an unknown key in it, and the
//! walker's own "expected one of: …" names its key table (`Walker::unknown_keys`).
//! So a key the parser learns appears in the schema, and one it drops disappears;
//! this file adds the *types* and descriptions ([`ty`]). A key without a type
//! here still appears, as "any value", and `every_key_the_parser_accepts_has_a_type`
//! fails until it gets one. The committed files are compared with the generated
//! ones by `the_committed_schemas_are_the_generated_ones`; `scripts/schema.sh`
//! rewrites them.

use std::path::Path;

use serde_json::{Value, json};

/// The key no table accepts, that each probe puts in the table it asks about.
const PROBE: &str = "zz_schema_probe";

/// Which file a schema is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Pipeline,
    Config,
}

impl Which {
    /// The committed file, under `docs/schema/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Which::Pipeline => "pipeline.schema.json",
            Which::Config => "config.schema.json",
        }
    }
}

/// A table of the format: where it is, and a minimal document that puts the
/// probe key into it.
struct Table {
    /// How the walker names it in "unknown key `…` in CONTEXT".
    context: &'static str,
    /// The type table of [`ty`] its keys are looked up in.
    id: &'static str,
    which: Which,
    /// A document with `PROBE = 0` in the table.
    doc: &'static str,
}

const TABLES: &[Table] = &[
    Table {
        context: "the pipeline file",
        id: "pipeline",
        which: Which::Pipeline,
        doc: "zz_schema_probe = 0\n",
    },
    Table {
        context: "concurrency",
        id: "concurrency",
        which: Which::Pipeline,
        doc: "concurrency = { zz_schema_probe = 0 }\n",
    },
    Table {
        context: "[inputs.x]",
        id: "input",
        which: Which::Pipeline,
        doc: "[inputs.x]\npath = \"x\"\nzz_schema_probe = 0\n",
    },
    Table {
        context: "[[trigger]]",
        id: "trigger.cron",
        which: Which::Pipeline,
        doc: "[[trigger]]\ncron = \"0 3 * * *\"\nzz_schema_probe = 0\n",
    },
    Table {
        context: "[[trigger]]",
        id: "trigger.watch",
        which: Which::Pipeline,
        doc: "[[trigger]]\nwatch = \"x/*.csv\"\nzz_schema_probe = 0\n",
    },
    Table {
        context: "[[trigger]]",
        id: "trigger.after",
        which: Which::Pipeline,
        doc: "[[trigger]]\nafter = \"x\"\nzz_schema_probe = 0\n",
    },
    Table {
        context: "[[step]]",
        id: "step",
        which: Which::Pipeline,
        doc: "[[step]]\nname = \"s\"\nwasm = \"x.wasm\"\nzz_schema_probe = 0\n",
    },
    Table {
        context: "python",
        id: "python",
        which: Which::Pipeline,
        doc: "[[step]]\nname = \"s\"\npython = { script = \"x.py\", zz_schema_probe = 0 }\n",
    },
    Table {
        context: "container",
        id: "container",
        which: Which::Pipeline,
        doc: "[[step]]\nname = \"s\"\ncontainer = { image = \"x\", zz_schema_probe = 0 }\n",
    },
    Table {
        context: "transfer",
        id: "transfer",
        which: Which::Pipeline,
        doc: "[[step]]\nname = \"s\"\ntransfer = { from = \"a.b\", to = \"x\", zz_schema_probe = 0 }\n",
    },
    Table {
        context: "retries",
        id: "retries",
        which: Which::Pipeline,
        doc: "[[step]]\nname = \"s\"\nwasm = \"x.wasm\"\nretries = { zz_schema_probe = 0 }\n",
    },
    Table {
        context: "the daemon config",
        id: "config",
        which: Which::Config,
        doc: "zz_schema_probe = 0\n",
    },
    Table {
        context: "[api]",
        id: "api",
        which: Which::Config,
        doc: "[api]\nzz_schema_probe = 0\n",
    },
    Table {
        context: "[datastores.x]",
        id: "datastore",
        which: Which::Config,
        doc: "[datastores.x]\npath = \"/x\"\nzz_schema_probe = 0\n",
    },
    Table {
        context: "[compute.x]",
        id: "compute",
        which: Which::Config,
        doc: "[compute.x]\nkind = \"slurm\"\nzz_schema_probe = 0\n",
    },
    Table {
        context: "[python]",
        id: "config.python",
        which: Which::Config,
        doc: "[python]\nzz_schema_probe = 0\n",
    },
    Table {
        context: "[secrets.x]",
        id: "secret",
        which: Which::Config,
        doc: "[secrets.x]\nenv = \"X\"\nzz_schema_probe = 0\n",
    },
];

/// The keys the parser accepts in `table`, in its order: from the walker's
/// "expected one of" for the probe key.
fn keys(table: &Table) -> Result<Vec<String>, String> {
    let path = Path::new("/schema-probe/probe.toml");
    let diags = match table.which {
        Which::Pipeline => {
            let env = crate::definition::Environment::default();
            crate::definition::walk(path, table.doc.to_string(), &env).2
        }
        Which::Config => {
            crate::config::parse(path, table.doc.to_string())
                .1
                .diagnostics
        }
    };
    let wanted = format!("unknown key `{PROBE}` in {}", table.context);
    let d = diags
        .iter()
        .find(|d| d.message == wanted)
        .ok_or_else(|| format!("the parser no longer says \"{wanted}\""))?;
    let list = d
        .help
        .as_deref()
        .and_then(|h| h.strip_prefix("expected one of: "))
        .ok_or_else(|| format!("{wanted}: no list of keys in {:?}", d.help))?;
    Ok(list.split(", ").map(str::to_string).collect())
}

fn string(doc: &str) -> Value {
    json!({ "type": "string", "description": doc })
}
fn boolean(doc: &str) -> Value {
    json!({ "type": "boolean", "description": doc })
}
fn strings(doc: &str) -> Value {
    json!({ "type": "array", "items": { "type": "string" }, "description": doc })
}
fn string_map(doc: &str) -> Value {
    json!({ "type": "object", "additionalProperties": { "type": "string" }, "description": doc })
}
fn one_of(values: &[&str], doc: &str) -> Value {
    json!({ "type": "string", "enum": values, "description": doc })
}
fn duration(doc: &str) -> Value {
    json!({ "type": "string", "description": format!("{doc} (a duration: `90s`, `5m`, `2h`)") })
}
fn size(doc: &str) -> Value {
    json!({ "type": "string", "description": format!("{doc} (a size: `512MiB`, `2GiB`)") })
}

/// A table's schema: its keys from the parser, their types from [`ty`].
fn object(id: &str, doc: &str) -> Result<Value, String> {
    let mut props = serde_json::Map::new();
    for t in TABLES.iter().filter(|t| t.id == id) {
        for k in keys(t)? {
            let v = ty(id, &k).unwrap_or_else(|| json!({ "description": "(no type recorded)" }));
            props.insert(k, v);
        }
    }
    Ok(json!({
        "type": "object",
        "description": doc,
        "additionalProperties": false,
        "properties": props,
    }))
}

/// The type of `key` in the table `id`. Keys the parser does not (yet) accept
/// are never asked for, so a type may be written ahead of its key.
fn ty(id: &str, key: &str) -> Option<Value> {
    let sub = |id: &str, doc: &str| object(id, doc).ok();
    Some(match (id, key) {
        ("pipeline", "name") => string("The pipeline's name; default: the file name"),
        ("pipeline", "description") | ("step", "description") | ("input", "description") => {
            string("What it is for")
        }
        ("pipeline", "experiment") => string("Groups runs for comparison; default: the name"),
        ("pipeline", "concurrency") => sub(
            "concurrency",
            "How many runs at once, and what a further one does",
        )?,
        ("pipeline", "params") => json!({
            "type": "object",
            "description": "Typed defaults, overridden per run or trigger",
            "additionalProperties": { "type": ["string", "integer", "number", "boolean"] },
        }),
        ("pipeline", "inputs") => json!({
            "type": "object",
            "description": "Datasets: a file or directory, hashed by content",
            "additionalProperties": sub("input", "A dataset")?,
        }),
        ("pipeline", "trigger") => json!({
            "type": "array",
            "description": "What fires a run under `millrace daemon`",
            "items": { "oneOf": [
                with_required(sub("trigger.cron", "A schedule")?, "cron"),
                with_required(sub("trigger.watch", "Files that change")?, "watch"),
                with_required(sub("trigger.after", "Another pipeline's success")?, "after"),
            ]},
        }),
        ("pipeline", "step") => {
            let mut step = sub(
                "step",
                "A step: exactly one of wasm, python, container, module, transfer",
            )?;
            step["required"] = json!(["name"]);
            step["oneOf"] = json!(
                ["wasm", "python", "container", "module", "transfer"]
                    .iter()
                    .map(|k| json!({ "required": [k] }))
                    .collect::<Vec<_>>()
            );
            json!({ "type": "array", "description": "The steps", "items": step })
        }
        ("concurrency", "max_runs") => {
            json!({ "type": "integer", "minimum": 1, "description": "Runs at once" })
        }
        ("concurrency", "overlap") => one_of(&["queue", "skip", "cancel"], "A run beyond max_runs"),
        ("input", "path") => string("Relative to the datastore; may interpolate ${params.X}"),
        ("input", "datastore") | ("trigger.watch", "datastore") | ("transfer", "datastore") => {
            string("A datastore of the daemon config; default `default`")
        }
        ("trigger.cron", "cron") => string("5 fields, or 6 with seconds first"),
        ("trigger.cron", "timezone") => string("An IANA zone; default UTC"),
        ("trigger.cron", "catchup") => one_of(
            &["none", "latest", "all", "coalesce"],
            "Firings missed while down",
        ),
        ("trigger.watch", "watch") => string("A glob; fires when matching content changes"),
        ("trigger.watch", "debounce") => duration("Quiet period before firing"),
        ("trigger.after", "after") => string("Fires when that pipeline's run succeeds"),
        (t, "params") if t.starts_with("trigger.") => json!({
            "type": "object",
            "description": "Param overrides for the runs it fires",
            "additionalProperties": { "type": ["string", "integer", "number", "boolean"] },
        }),
        ("step", "name") => string("Unique in the pipeline"),
        ("step", "wasm") => string("A WASM module, relative to the pipeline file"),
        ("step", "python") => json!({
            "description": "A Python script, or { script, code, snapshot }",
            "oneOf": [{ "type": "string" }, sub("python", "A Python step")?],
        }),
        ("step", "container") => sub("container", "An OCI image run by podman or docker")?,
        ("step", "module") => string("A published module: `name@version` or a range"),
        ("step", "transfer") => sub("transfer", "Copy an artifact to a datastore")?,
        ("step", "compute") => string("A compute target of the daemon config; default `local`"),
        ("step", "args") => {
            strings("Arguments; may interpolate ${params.X}, ${inputs.X}, ${outputs.X}")
        }
        ("step", "env") | ("container", "env") => string_map("Environment variables"),
        ("step", "params") => strings("Params the step reads as MILLRACE_PARAM_*"),
        ("step", "inputs") => string_map("Mount → `inputs.NAME` or `STEP.OUTPUT`"),
        ("step", "outputs") => strings("Directories captured from /out"),
        ("step", "after") => strings("Steps this one runs after, without data"),
        ("step", "timeout") => duration("Deadline of an attempt"),
        ("step", "memory") => size("Memory limit"),
        ("step", "cpus") => {
            json!({ "type": "number", "exclusiveMinimum": 0, "description": "CPUs" })
        }
        ("step", "retries") => sub("retries", "Attempts after a failure")?,
        ("step", "reuse") => boolean("false: always execute"),
        ("step", "secrets") => strings("Secrets of the daemon config, read at /run/secrets/NAME"),
        ("step", "secret_env") => string_map("Variable → one of the step's secrets"),
        ("step", "foreach") => string("A reference whose items each run the step"),
        ("python", "script") => string("The script, relative to `code`"),
        ("python", "code") => string("The code directory, mounted at /code"),
        ("python", "snapshot") => {
            boolean("false: start the base runtime, not the warm interpreter")
        }
        ("container", "image") => string("Image reference"),
        ("container", "command") | ("container", "entrypoint") => strings("Argument vector"),
        ("container", "workdir") | ("container", "user") => string("As the engine takes it"),
        ("container", "network") => boolean("true: the engine's default network; default none"),
        ("container", "read_only_root") => boolean("false: a writable root filesystem"),
        ("transfer", "from") => string("`STEP.OUTPUT`"),
        ("transfer", "to") => string("Relative to the datastore"),
        ("transfer", "mode") => one_of(
            &["replace", "merge"],
            "The destination becomes the artifact, or gets its files",
        ),
        ("retries", "attempts") => {
            json!({ "type": "integer", "minimum": 1, "description": "Attempts in all" })
        }
        ("retries", "backoff") => duration("First wait; doubles each time"),
        ("config", "pipelines") => string("The pipelines directory"),
        ("config", "state_dir") => string("The state directory"),
        ("config", "max_parallel_steps") => {
            json!({ "type": "integer", "minimum": 1, "description": "Steps at once" })
        }
        ("config", "shutdown_grace") => duration("How long running steps get at shutdown"),
        ("config", "resume_interrupted") => boolean("Resume runs interrupted by a stop"),
        ("config", "api") => sub("api", "The REST API")?,
        ("config", "datastores") => json!({
            "type": "object",
            "description": "Named directories inputs, watches and transfers are relative to",
            "additionalProperties": sub("datastore", "A datastore")?,
        }),
        ("config", "compute") => json!({
            "type": "object",
            "description": "Compute targets besides `local`",
            "additionalProperties": sub("compute", "A compute target")?,
        }),
        ("config", "python") => sub("config.python", "Python steps' warm interpreter")?,
        ("config", "secrets") => {
            let mut secret = sub("secret", "A secret: exactly one of file, env")?;
            secret["oneOf"] = json!([{ "required": ["file"] }, { "required": ["env"] }]);
            json!({
                "type": "object",
                "description": "Secrets steps name in `secrets`: values never enter a key, a record or a log",
                "additionalProperties": secret,
            })
        }
        ("secret", "file") => string("A file readable by its owner only"),
        ("secret", "env") => string("A variable of the daemon's environment"),
        ("api", "listen") => string("host:port"),
        ("api", "token_file") => string("The bearer token's file"),
        ("api", "public_read") => boolean("GET without the token"),
        ("api", "allowed_hosts") => strings("Host names answered besides loopback"),
        ("datastore", "path") => string("The directory"),
        ("compute", "kind") => one_of(&["local", "container", "slurm"], "The kind of target"),
        ("compute", "socket") => string("The container engine's socket"),
        ("compute", "pull") => boolean("Pull missing images"),
        ("compute", "cpus_per_task") => {
            json!({ "type": "integer", "minimum": 1, "maximum": 4096, "description": "sbatch --cpus-per-task" })
        }
        ("compute", "extra_args") => strings("Further sbatch arguments"),
        ("compute", k) if SLURM_TEXT.contains(&k) => string("sbatch's option of that name"),
        ("config.python", "preload") => strings("Modules imported in the warm interpreter"),
        ("config.python", "snapshot") => {
            boolean("false: every Python step starts the base runtime")
        }
        _ => return None,
    })
}

/// Slurm settings given as text.
const SLURM_TEXT: &[&str] = &[
    "partition",
    "account",
    "qos",
    "time_limit",
    "gpus",
    "gres",
    "mem",
    "shared_dir",
];

fn with_required(mut v: Value, key: &str) -> Value {
    v["required"] = json!([key]);
    v
}

/// The schema of `which`, as committed under docs/schema/.
pub fn generate(which: Which) -> Result<Value, String> {
    let (id, title) = match which {
        Which::Pipeline => ("pipeline", "A millrace pipeline file"),
        Which::Config => ("config", "The millrace daemon config"),
    };
    let mut root = object(id, title)?;
    let root_map = root.as_object_mut().expect("an object");
    let mut out = serde_json::Map::new();
    out.insert(
        "$schema".into(),
        json!("http://json-schema.org/draft-07/schema#"),
    );
    out.insert("title".into(), json!(title));
    out.append(root_map);
    Ok(Value::Object(out))
}

/// The text of the committed file: pretty JSON and a final newline.
pub fn text(which: Which) -> Result<String, String> {
    Ok(serde_json::to_string_pretty(&generate(which)?).expect("plain data") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_the_parser_accepts_has_a_type() {
        let mut missing = Vec::new();
        for t in TABLES {
            for k in keys(t).unwrap() {
                if ty(t.id, &k).is_none() {
                    missing.push(format!("{}.{k}", t.id));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "keys without a type in daemon/src/schema.rs `ty`: {missing:?}"
        );
    }

    #[test]
    fn the_committed_schemas_are_the_generated_ones() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schema");
        for which in [Which::Pipeline, Which::Config] {
            let path = dir.join(which.file_name());
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == text(which).unwrap(),
                "{} is not what the parser accepts now: run scripts/schema.sh and commit it",
                path.display()
            );
        }
    }
}
