//! `usage`: tasks, tokens, success rate, averages, models and trend per
//! period, from the audit log (through `usage.idx`), with a 30-day chart.

use std::fmt::Write as _;
use std::io::IsTerminal;

use chrono::Utc;
use serde_json::json;

use crate::context::{Ctx, Printer};
use crate::exit::{Exit, Failure, Result};
use crate::timespec;
use crate::usage_report::{self as analytics, Period, Stats, UsageReport};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Group tasks by local day, ISO week (Monday to Sunday) or month
    #[arg(long, value_enum, default_value = "day")]
    pub period: PeriodArg,
    /// Only tasks at or after T (RFC 3339, a local date, or an age like 7d)
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Output format (`--json` is the same as `--format json`)
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PeriodArg {
    Day,
    Week,
    Month,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

pub fn run(ctx: &Ctx, args: Args) -> Result<Exit> {
    let now = Utc::now();
    let since = args
        .since
        .as_deref()
        .map(|s| timespec::parse_since(s, now))
        .transpose()
        .map_err(|m| Failure::usage(m).hint("for example `--since 7d` or `--since 2026-11-01`"))?;
    let period = match args.period {
        PeriodArg::Day => Period::Day,
        PeriodArg::Week => Period::Week,
        PeriodArg::Month => Period::Month,
    };
    let report = analytics::report(&ctx.paths, period, since, now)?;
    let p = ctx.out();
    if report.index.rebuilt {
        p.detail(&format!(
            "rebuilt {} ({}): read {} bytes of the audit log",
            analytics::index_path(&ctx.paths).display(),
            report.index.reason.as_deref().unwrap_or("stale"),
            report.index.bytes_read
        ));
    }
    let format = if p.json { Format::Json } else { args.format };
    match format {
        Format::Json => p.json(json!(report)),
        Format::Csv => p.out(&csv(&report)),
        Format::Table => {
            let fancy = std::io::stdout().is_terminal();
            p.out(&table(&report, p, fancy));
        }
    }
    Ok(Exit::Ok)
}

fn opt(v: Option<f64>, suffix: &str) -> String {
    v.map(|v| format!("{v:.1}{suffix}")).unwrap_or_else(|| "-".into())
}

/// `model:count model:count`, most used first.
fn models(s: &Stats, sep: &str) -> String {
    let mut m: Vec<(&String, &u64)> = s.models.iter().collect();
    m.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    m.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(sep)
}

fn trend(t: Option<&analytics::Trend>) -> String {
    match t {
        None => "-".into(),
        Some(t) => match t.tasks_change_pct {
            Some(pct) => format!("{pct:+.1}%"),
            None if t.tasks_change > 0 => "new".into(),
            None => "-".into(),
        },
    }
}

const HEADER: [&str; 11] = [
    "period", "tasks", "ok%", "input", "output", "cache_wr", "cache_rd", "total", "avg_tok", "avg_s", "trend",
];

fn cells(label: &str, s: &Stats, tr: String) -> [String; 11] {
    [
        label.to_string(),
        s.tasks.to_string(),
        opt(s.success_rate_pct, ""),
        s.tokens.input.to_string(),
        s.tokens.output.to_string(),
        s.tokens.cache_creation.to_string(),
        s.tokens.cache_read.to_string(),
        s.tokens.total.to_string(),
        opt(s.avg_tokens_per_task, ""),
        opt(s.avg_duration_s, ""),
        tr,
    ]
}

fn table(r: &UsageReport, p: &Printer, fancy: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} per {} ({}{})",
        p.bold("Usage"),
        r.period.name(),
        r.time_zone,
        r.since.as_deref().map(|s| format!(", since {s}")).unwrap_or_default()
    );
    if r.totals.tasks == 0 {
        let _ = writeln!(out, "no finished tasks in the audit log yet");
    } else {
        let mut rows: Vec<([String; 11], String)> = r
            .rows
            .iter()
            .map(|row| {
                (
                    cells(&row.period, &row.stats, trend(row.trend.as_ref())),
                    models(&row.stats, " "),
                )
            })
            .collect();
        rows.push((cells("total", &r.totals, "".into()), models(&r.totals, " ")));
        let head = HEADER.map(str::to_string);
        let mut widths = [0usize; 11];
        for c in std::iter::once(&head).chain(rows.iter().map(|r| &r.0)) {
            for (w, s) in widths.iter_mut().zip(c) {
                *w = (*w).max(s.chars().count());
            }
        }
        let line = |c: &[String; 11], m: &str| {
            let mut s = format!("{:<w$}", c[0], w = widths[0]);
            for (i, cell) in c.iter().enumerate().skip(1) {
                let _ = write!(s, "  {:>w$}", cell, w = widths[i]);
            }
            format!("{s}  {m}").trim_end().to_string()
        };
        let _ = writeln!(out, "{}", line(&head, "models"));
        for (c, m) in &rows {
            let _ = writeln!(out, "{}", line(c, m));
        }
    }
    out.push('\n');
    out.push_str(&chart(r, fancy));
    out
}

/// The last 30 days: sparklines on a terminal, a plain-text bar chart
/// otherwise (pipes, files, screen readers).
fn chart(r: &UsageReport, fancy: bool) -> String {
    let days = &r.last_30_days;
    let (first, last) = match (days.first(), days.last()) {
        (Some(f), Some(l)) => (f.date, l.date),
        _ => return String::new(),
    };
    let max_tasks = days.iter().map(|d| d.tasks).max().unwrap_or(0);
    let max_tokens = days.iter().map(|d| d.total_tokens).max().unwrap_or(0);
    let mut out = format!("Last 30 days ({first} to {last})\n");
    if fancy {
        const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
        let spark = |v: u64, max: u64| -> char {
            if max == 0 || v == 0 {
                ' '
            } else {
                BLOCKS[((v * 7).div_ceil(max)) as usize]
            }
        };
        let tasks: String = days.iter().map(|d| spark(d.tasks, max_tasks)).collect();
        let tokens: String = days.iter().map(|d| spark(d.total_tokens, max_tokens)).collect();
        let _ = writeln!(out, "  tasks   {tasks}  max {max_tasks}/day");
        let _ = writeln!(out, "  tokens  {tokens}  max {max_tokens}/day");
    } else {
        const WIDTH: u64 = 40;
        for d in days {
            let n = if max_tasks == 0 {
                0
            } else {
                (d.tasks * WIDTH).div_ceil(max_tasks)
            };
            let _ = writeln!(
                out,
                "  {}  {:>5} {:<w$}  {} tokens",
                d.date,
                d.tasks,
                "#".repeat(n as usize),
                d.total_tokens,
                w = WIDTH as usize
            );
        }
    }
    out
}

fn csv(r: &UsageReport) -> String {
    let mut out = String::from(
        "period,start,end,tasks,succeeded,failed,killed,cancelled,success_rate_pct,input_tokens,output_tokens,\
cache_creation_tokens,cache_read_tokens,total_tokens,avg_tokens_per_task,avg_duration_s,duration_ms,\
tasks_change,tasks_change_pct,tokens_change,tokens_change_pct,models\n",
    );
    let num = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_default();
    let mut row = |label: &str, start: String, end: String, s: &Stats, t: Option<&analytics::Trend>| {
        let _ = writeln!(
            out,
            "{label},{start},{end},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            s.tasks,
            s.succeeded,
            s.failed,
            s.killed,
            s.cancelled,
            num(s.success_rate_pct),
            s.tokens.input,
            s.tokens.output,
            s.tokens.cache_creation,
            s.tokens.cache_read,
            s.tokens.total,
            num(s.avg_tokens_per_task),
            num(s.avg_duration_s),
            s.duration_ms,
            t.map(|t| t.tasks_change.to_string()).unwrap_or_default(),
            num(t.and_then(|t| t.tasks_change_pct)),
            t.map(|t| t.tokens_change.to_string()).unwrap_or_default(),
            num(t.and_then(|t| t.tokens_change_pct)),
            csv_field(&models(s, ";")),
        );
    };
    for r in &r.rows {
        row(
            &r.period,
            r.start.to_string(),
            r.end.to_string(),
            &r.stats,
            r.trend.as_ref(),
        );
    }
    let (start, end) = match (r.rows.first(), r.rows.last()) {
        (Some(f), Some(l)) => (f.start.to_string(), l.end.to_string()),
        _ => (String::new(), String::new()),
    };
    row("total", start, end, &r.totals, None);
    out
}

/// Quote a CSV field when it needs it (model names are free text).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage_report::{DayPoint, Freshness, Tally};

    fn report(tasks: &[u64]) -> UsageReport {
        let start = chrono::NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        UsageReport {
            period: Period::Day,
            time_zone: "UTC".into(),
            since: None,
            generated_at: String::new(),
            rows: vec![],
            totals: Stats::from_tally(&Tally::default()),
            last_30_days: tasks
                .iter()
                .enumerate()
                .map(|(i, &n)| DayPoint {
                    date: start + chrono::Duration::days(i as i64),
                    tasks: n,
                    succeeded: n,
                    total_tokens: n * 100,
                })
                .collect(),
            index: Freshness {
                rebuilt: false,
                reason: None,
                bytes_read: 0,
            },
        }
    }

    #[test]
    fn sparklines_on_a_terminal_scale_to_the_busiest_day() {
        let r = report(&[0, 1, 7, 14]);
        let c = chart(&r, true);
        assert!(c.contains("tasks    ▂▅█  max 14/day"), "{c}");
        assert!(c.contains("tokens   ▂▅█  max 1400/day"), "{c}");
    }

    #[test]
    fn plain_bars_without_a_terminal() {
        let r = report(&[0, 2, 4]);
        let c = chart(&r, false);
        let lines: Vec<&str> = c.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[1].starts_with("  2026-11-01      0 "), "{c}");
        assert_eq!(lines[2].matches('#').count(), 20);
        assert_eq!(lines[3].matches('#').count(), 40);
        assert!(lines[3].ends_with("400 tokens"));
        assert!(c.is_ascii());
    }
}
