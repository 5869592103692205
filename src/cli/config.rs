//! `config`: read and change settings. Typed by the schema, validated,
//! written atomically under the config lock, and every change audited.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::config::{self as cfgmod, Config, KeyDef, Origin};
use crate::context::Ctx;
use crate::exit::{Exit, Failure, Result};

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("action").args(["list", "get", "set", "unset", "import", "export"])))]
pub struct Args {
    /// List every key with its value and origin (default, file, env)
    #[arg(long)]
    pub list: bool,
    /// Print one key's value
    #[arg(long, value_name = "KEY")]
    pub get: Option<String>,
    /// Set KEY=VALUE (repeatable; all or nothing)
    #[arg(long, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Remove a key from the file so its default applies (repeatable)
    #[arg(long, value_name = "KEY")]
    pub unset: Vec<String>,
    /// Load settings from a JSON file (seed-compatible sections; at most 1 MiB)
    #[arg(long, value_name = "FILE")]
    pub import: Option<PathBuf>,
    /// Write the effective settings to a new JSON file, mode 0600 (`-` for stdout)
    #[arg(long, value_name = "FILE")]
    pub export: Option<PathBuf>,
}

/// Apply changes in one audited write ([`crate::txn::set_config`]) and
/// reload the config. `None` removes the key (its default applies).
pub fn apply(
    ctx: &mut Ctx,
    changes: Vec<(&'static KeyDef, Option<Value>)>,
    via: &str,
) -> Result<Vec<crate::txn::Applied>> {
    let applied = crate::txn::set_config(&ctx.paths, &changes, via)?;
    ctx.reload_config();
    Ok(applied)
}

fn show_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "none".into(),
        other => other.to_string(),
    }
}

pub fn run(ctx: &mut Ctx, args: Args) -> Result<Exit> {
    if let Some(key) = &args.get {
        let d = cfgmod::def_or_suggest(key)?;
        let cfg = ctx.config()?;
        let p = ctx.out();
        if p.json {
            p.json(json!({ "key": d.key, "value": cfg.get(d), "origin": cfg.origin(d).to_string() }));
        } else {
            p.out(&show_value(cfg.get(d)));
        }
        return Ok(Exit::Ok);
    }
    if !args.set.is_empty() || !args.unset.is_empty() {
        let mut changes = Vec::new();
        for s in &args.set {
            let (d, v) = cfgmod::parse_assignment(s)?;
            changes.push((d, Some(v)));
        }
        for k in &args.unset {
            changes.push((cfgmod::def_or_suggest(k)?, None));
        }
        let applied = apply(ctx, changes, "config")?;
        let cfg = ctx.config()?;
        let shadowed: Vec<String> = applied
            .iter()
            .filter_map(|(k, _, _)| match cfgmod::def(k).map(|d| cfg.origin(d)) {
                Some(Origin::Env(var)) => Some(format!("`{k}` is overridden by env {var}")),
                _ => None,
            })
            .collect();
        let p = ctx.out();
        for s in &shadowed {
            p.warn(s);
        }
        if p.json {
            p.json(json!({
                "ok": true,
                "changes": applied.iter().map(|(k, o, n)| json!({"key": k, "old": o, "new": n})).collect::<Vec<_>>(),
            }));
        } else if applied.is_empty() {
            p.out("No change.");
        } else {
            for (k, o, n) in &applied {
                p.out(&format!("{k}: {} -> {}", show_value(o), show_value(n)));
            }
        }
        return Ok(Exit::Ok);
    }
    if let Some(file) = &args.import {
        let cfgmod::Import { set, unknown: dropped } = cfgmod::read_import(file)?;
        let p = ctx.out().clone();
        for k in &dropped {
            p.warn(&format!("ignoring unknown key `{k}` in {}", file.display()));
        }
        let changes = set.into_iter().map(|(d, v)| (d, Some(v))).collect();
        let applied = apply(ctx, changes, "import")?;
        if p.json {
            p.json(json!({ "ok": true, "imported": applied.len(), "ignored": dropped }));
        } else {
            p.out(&format!(
                "Imported {} setting(s) from {}.",
                applied.len(),
                file.display()
            ));
        }
        return Ok(Exit::Ok);
    }
    if let Some(file) = &args.export {
        let cfg = ctx.config()?;
        let mut text = serde_json::to_string_pretty(&cfg.to_nested()).expect("JSON values serialise");
        text.push('\n');
        if file.as_os_str() == "-" {
            ctx.out().out(&text);
        } else {
            // Created new, mode 0600, never through a symlink (a dangling
            // one included): whatever is at FILE already stays as it was.
            let exists = || {
                Failure::usage(format!("{} already exists; not overwriting it", file.display()))
                    .hint("choose another file name or remove it first")
            };
            if file.symlink_metadata().is_ok() {
                return Err(exists().into());
            }
            crate::fsutil::write_new(file, text.as_bytes()).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => exists(),
                _ => Failure::new(
                    crate::exit::Exit::Failed,
                    format!("cannot write {}: {e}", file.display()),
                ),
            })?;
            let p = ctx.out();
            if p.json {
                p.json(json!({ "ok": true, "exported": file }));
            } else {
                p.note(&format!("Wrote {}.", file.display()));
            }
        }
        return Ok(Exit::Ok);
    }
    list(ctx.config()?, ctx)
}

fn list(cfg: &Config, ctx: &Ctx) -> Result<Exit> {
    let p = ctx.out();
    if p.json {
        let keys: Vec<Value> = cfg
            .entries()
            .map(|(d, v, o)| json!({ "key": d.key, "value": v, "origin": o.to_string(), "default": cfgmod::default_value(d.key), "help": d.help }))
            .collect();
        p.json(json!({ "path": cfg.path(), "keys": keys, "unknown": cfg.unknown }));
        return Ok(Exit::Ok);
    }
    let width = cfg.entries().map(|(d, _, _)| d.key.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (d, v, o) in cfg.entries() {
        out.push_str(&format!(
            "{:width$}  {:<34} {}\n",
            d.key,
            show_value(v),
            p.paint(&format!("({o})"), "2")
        ));
    }
    p.out(out.trim_end());
    for k in &cfg.unknown {
        p.warn(&format!("{}: unknown key `{k}` is ignored", cfg.path().display()));
    }
    Ok(Exit::Ok)
}
