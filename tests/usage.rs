//! `usage`: every figure checked against a generated log with known totals
//! across day, ISO week, month and DST boundaries in the local time zone,
//! and the index kept in step with the log (caught up, or rebuilt when
//! missing, unreadable, for another zone or for another log).

mod common;

use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeZone, Utc};
use claude_max_market::audit::write_backdated_log_for_tests;
use claude_max_market::{AuditLog, Paths};
use common::Cmm;
use serde_json::{json, Value};

const NY: &str = "America/New_York";

/// A local wall-clock time at a fixed UTC offset (hours), as UTC.
fn at(local: &str, offset_h: i32) -> DateTime<Utc> {
    let naive = NaiveDateTime::parse_from_str(local, "%Y-%m-%d %H:%M").unwrap();
    FixedOffset::east_opt(offset_h * 3600)
        .unwrap()
        .from_local_datetime(&naive)
        .unwrap()
        .with_timezone(&Utc)
}

type Event = (DateTime<Utc>, String, Value);

/// One job as the job pipeline records it: approved, started, one terminal event.
fn job(id: &str, end: DateTime<Utc>, terminal: &str, model: &str, tokens: [u64; 4], duration_ms: u64) -> Vec<Event> {
    let [i, o, cw, cr] = tokens;
    let mut fields = json!({
        "job_id": id, "model": model, "duration_ms": duration_ms,
        "usage": { "input_tokens": i, "output_tokens": o, "cache_creation_input_tokens": cw,
                   "cache_read_input_tokens": cr, "total_tokens": i + o + cw + cr },
        "cost_usd": 0.01, "num_turns": 2, "exit_code": 0
    });
    if terminal == "job.killed" {
        fields["reason"] = json!("token-cap");
    }
    let start = end - chrono::Duration::milliseconds(duration_ms as i64);
    vec![
        (
            start,
            "job.approved".into(),
            json!({ "job_id": id, "how": "approve-all" }),
        ),
        (
            start,
            "job.started".into(),
            json!({ "job_id": id, "model": model, "image": "cmm-runner:latest", "prompt_sha256": "0".repeat(64),
                    "max_tokens": 10000, "timeout_s": 600, "source": "local" }),
        ),
        (end, terminal.into(), fields),
    ]
}

/// Eight tasks in New York time. Offsets: EST is UTC-5, EDT (from
/// 2026-03-08 03:00) is UTC-4.
///
/// | job | local time              | outcome   | model  | tokens | ms    |
/// | A   | Sun 2025-12-28 22:00    | completed | sonnet | 200    | 1000  |
/// | B   | Wed 2025-12-31 23:30    | failed    | opus   | 300    | 3000  |  UTC: Jan 1
/// | C   | Thu 2026-01-01 00:30    | completed | sonnet | 400    | 2000  |
/// | D   | Sun 2026-01-04 23:59    | killed    | sonnet | 1000   | 60000 |  last minute of 2026-W01
/// | E   | Mon 2026-01-05 00:01    | completed | haiku  | 500    | 4000  |  first minute of 2026-W02
/// | F   | Mon 2026-01-05 10:00    | cancelled | haiku  | 0      | 500   |
/// | G   | Sun 2026-03-08 00:30    | completed | sonnet | 100    | 1000  |  DST day (23 hours)
/// | H   | Sun 2026-03-08 23:30    | completed | sonnet | 100    | 1000  |  UTC: Mar 9
fn history() -> Vec<Event> {
    let mut ev: Vec<Event> = vec![(
        at("2025-12-28 08:00", -5),
        "consent.accepted".into(),
        json!({ "terms_version": "x" }),
    )];
    ev.extend(job(
        "A",
        at("2025-12-28 22:00", -5),
        "job.completed",
        "sonnet",
        [100, 50, 10, 40],
        1000,
    ));
    ev.push((
        at("2025-12-29 09:00", -5),
        "job.denied".into(),
        json!({ "job_id": "Z", "reason": "no tty" }),
    ));
    ev.extend(job(
        "B",
        at("2025-12-31 23:30", -5),
        "job.failed",
        "opus",
        [200, 100, 0, 0],
        3000,
    ));
    ev.extend(job(
        "C",
        at("2026-01-01 00:30", -5),
        "job.completed",
        "sonnet",
        [300, 50, 25, 25],
        2000,
    ));
    ev.extend(job(
        "D",
        at("2026-01-04 23:59", -5),
        "job.killed",
        "sonnet",
        [600, 400, 0, 0],
        60000,
    ));
    ev.extend(job(
        "E",
        at("2026-01-05 00:01", -5),
        "job.completed",
        "haiku",
        [250, 250, 0, 0],
        4000,
    ));
    ev.extend(job(
        "F",
        at("2026-01-05 10:00", -5),
        "job.cancelled",
        "haiku",
        [0, 0, 0, 0],
        500,
    ));
    ev.push((
        at("2026-02-10 12:00", -5),
        "config.set".into(),
        json!({ "key": "limits.dailyTasks" }),
    ));
    ev.extend(job(
        "G",
        at("2026-03-08 00:30", -5),
        "job.completed",
        "sonnet",
        [60, 40, 0, 0],
        1000,
    ));
    ev.extend(job(
        "H",
        at("2026-03-08 23:30", -4),
        "job.completed",
        "sonnet",
        [60, 40, 0, 0],
        1000,
    ));
    ev.sort_by_key(|e| e.0);
    ev
}

fn with_history() -> Cmm {
    // Without zone data chrono falls back to UTC and every figure below
    // would be off by a few hours: say so plainly instead.
    assert!(
        std::path::Path::new("/usr/share/zoneinfo/America/New_York").exists(),
        "these tests need the tz database: apt-get install -y tzdata"
    );
    let t = Cmm::new();
    write_backdated_log_for_tests(&Paths::in_one_dir(t.path().to_path_buf()), history()).unwrap();
    t
}

fn usage(t: &Cmm, tz: &str, args: &[&str]) -> Value {
    let mut a = vec!["usage", "--format", "json"];
    a.extend_from_slice(args);
    t.cmd(&a).env("TZ", tz).run().code(0).json()
}

fn row<'a>(doc: &'a Value, period: &str) -> &'a Value {
    doc["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["period"] == period)
        .unwrap_or_else(|| panic!("no row {period}"))
}

/// The figures of a row, in one comparable value.
fn figures(r: &Value) -> Value {
    json!({
        "tasks": r["tasks"], "succeeded": r["succeeded"], "failed": r["failed"], "killed": r["killed"],
        "cancelled": r["cancelled"], "success_rate_pct": r["success_rate_pct"], "tokens": r["tokens"],
        "avg_tokens_per_task": r["avg_tokens_per_task"], "avg_duration_s": r["avg_duration_s"],
        "duration_ms": r["duration_ms"], "models": r["models"],
    })
}

fn tokens(i: u64, o: u64, cw: u64, cr: u64) -> Value {
    json!({ "input": i, "output": o, "cache_creation": cw, "cache_read": cr, "total": i + o + cw + cr })
}

#[test]
fn the_generated_log_verifies() {
    let t = with_history();
    t.run(&["audit", "verify"]).code(0).stdout_has("audit chain OK");
}

#[test]
fn days_are_local_days() {
    let t = with_history();
    let d = usage(&t, NY, &["--period", "day"]);
    assert_eq!(d["time_zone"], NY);
    assert_eq!(d["period"], "day");
    // Rows run without gaps from the first task's day to today.
    let rows = d["rows"].as_array().unwrap();
    assert_eq!(rows[0]["period"], "2025-12-28");
    assert_eq!(rows[1]["period"], "2025-12-29");
    assert_eq!(rows[1]["tasks"], 0);
    assert_eq!(
        figures(row(&d, "2025-12-31")),
        json!({ "tasks": 1, "succeeded": 0, "failed": 1, "killed": 0, "cancelled": 0, "success_rate_pct": 0.0,
                "tokens": tokens(200, 100, 0, 0), "avg_tokens_per_task": 300.0, "avg_duration_s": 3.0,
                "duration_ms": 3000, "models": { "opus": 1 } })
    );
    assert_eq!(
        figures(row(&d, "2026-01-01")),
        json!({ "tasks": 1, "succeeded": 1, "failed": 0, "killed": 0, "cancelled": 0, "success_rate_pct": 100.0,
                "tokens": tokens(300, 50, 25, 25), "avg_tokens_per_task": 400.0, "avg_duration_s": 2.0,
                "duration_ms": 2000, "models": { "sonnet": 1 } })
    );
    assert_eq!(row(&d, "2026-01-04")["tasks"], 1);
    assert_eq!(row(&d, "2026-01-04")["killed"], 1);
    let jan5 = row(&d, "2026-01-05");
    assert_eq!(
        figures(jan5),
        json!({ "tasks": 2, "succeeded": 1, "failed": 0, "killed": 0, "cancelled": 1, "success_rate_pct": 50.0,
                "tokens": tokens(250, 250, 0, 0), "avg_tokens_per_task": 250.0, "avg_duration_s": 2.3,
                "duration_ms": 4500, "models": { "haiku": 2 } })
    );
    // Trend against the day before (one killed task, 1000 tokens).
    assert_eq!(
        jan5["trend"],
        json!({ "tasks_change": 1, "tasks_change_pct": 100.0, "tokens_change": -500, "tokens_change_pct": -50.0 })
    );
    // The 23-hour DST day holds both of its tasks; the next day none.
    assert_eq!(row(&d, "2026-03-08")["tasks"], 2);
    assert_eq!(row(&d, "2026-03-09")["tasks"], 0);
    assert_eq!(row(&d, "2026-03-09")["trend"]["tasks_change_pct"], -100.0);
    assert_eq!(row(&d, "2026-03-10")["trend"]["tasks_change_pct"], Value::Null);
    // Rows reach today.
    let today = chrono::Utc::now()
        .with_timezone(&chrono_tz_ny())
        .date_naive()
        .to_string();
    assert_eq!(rows.last().unwrap()["period"], today);
    assert_eq!(
        figures(&d["totals"]),
        json!({ "tasks": 8, "succeeded": 5, "failed": 1, "killed": 1, "cancelled": 1, "success_rate_pct": 62.5,
                "tokens": tokens(1570, 930, 35, 65), "avg_tokens_per_task": 325.0, "avg_duration_s": 9.1,
                "duration_ms": 72500, "models": { "haiku": 2, "opus": 1, "sonnet": 5 } })
    );
}

/// New York's offset today, to find "today" the way the binary does (the
/// test process itself may run in any zone).
fn chrono_tz_ny() -> FixedOffset {
    // DST in 2026: 8 March to 1 November; the tests run after that window or
    // in it, so pick by date. Good until the 2027 change in March.
    let now = chrono::Utc::now();
    let edt = now > at("2026-03-08 02:00", -5) && now < at("2026-11-01 02:00", -4);
    FixedOffset::east_opt(if edt { -4 * 3600 } else { -5 * 3600 }).unwrap()
}

#[test]
fn weeks_are_iso_weeks_across_the_year_end() {
    let t = with_history();
    let w = usage(&t, NY, &["--period", "week"]);
    let w52 = row(&w, "2025-W52");
    assert_eq!(
        (w52["start"].as_str(), w52["end"].as_str()),
        (Some("2025-12-22"), Some("2025-12-28"))
    );
    assert_eq!(
        figures(w52),
        json!({ "tasks": 1, "succeeded": 1, "failed": 0, "killed": 0, "cancelled": 0, "success_rate_pct": 100.0,
                "tokens": tokens(100, 50, 10, 40), "avg_tokens_per_task": 200.0, "avg_duration_s": 1.0,
                "duration_ms": 1000, "models": { "sonnet": 1 } })
    );
    assert_eq!(w52["trend"], Value::Null, "the first row has nothing to compare with");
    // 2026-W01 runs Mon 2025-12-29 to Sun 2026-01-04: B, C and D.
    let w01 = row(&w, "2026-W01");
    assert_eq!(
        (w01["start"].as_str(), w01["end"].as_str()),
        (Some("2025-12-29"), Some("2026-01-04"))
    );
    assert_eq!(
        figures(w01),
        json!({ "tasks": 3, "succeeded": 1, "failed": 1, "killed": 1, "cancelled": 0, "success_rate_pct": 33.3,
                "tokens": tokens(1100, 550, 25, 25), "avg_tokens_per_task": 566.7, "avg_duration_s": 21.7,
                "duration_ms": 65000, "models": { "opus": 1, "sonnet": 2 } })
    );
    assert_eq!(
        w01["trend"],
        json!({ "tasks_change": 2, "tasks_change_pct": 200.0, "tokens_change": 1500, "tokens_change_pct": 750.0 })
    );
    let w02 = row(&w, "2026-W02");
    assert_eq!(
        figures(w02),
        json!({ "tasks": 2, "succeeded": 1, "failed": 0, "killed": 0, "cancelled": 1, "success_rate_pct": 50.0,
                "tokens": tokens(250, 250, 0, 0), "avg_tokens_per_task": 250.0, "avg_duration_s": 2.3,
                "duration_ms": 4500, "models": { "haiku": 2 } })
    );
    assert_eq!(
        w02["trend"],
        json!({ "tasks_change": -1, "tasks_change_pct": -33.3, "tokens_change": -1200, "tokens_change_pct": -70.6 })
    );
    let w03 = row(&w, "2026-W03");
    assert_eq!(w03["tasks"], 0);
    assert_eq!(w03["success_rate_pct"], Value::Null);
    assert_eq!(w03["avg_tokens_per_task"], Value::Null);
    assert_eq!(
        row(&w, "2026-W10")["tasks"],
        2,
        "G and H fall in the week of Mon 2026-03-02"
    );
    assert_eq!(w["totals"]["tasks"], 8);
}

#[test]
fn months_split_at_local_midnight() {
    let t = with_history();
    let m = usage(&t, NY, &["--period", "month"]);
    assert_eq!(
        figures(row(&m, "2025-12")),
        json!({ "tasks": 2, "succeeded": 1, "failed": 1, "killed": 0, "cancelled": 0, "success_rate_pct": 50.0,
                "tokens": tokens(300, 150, 10, 40), "avg_tokens_per_task": 250.0, "avg_duration_s": 2.0,
                "duration_ms": 4000, "models": { "opus": 1, "sonnet": 1 } })
    );
    let jan = row(&m, "2026-01");
    assert_eq!(
        figures(jan),
        json!({ "tasks": 4, "succeeded": 2, "failed": 0, "killed": 1, "cancelled": 1, "success_rate_pct": 50.0,
                "tokens": tokens(1150, 700, 25, 25), "avg_tokens_per_task": 475.0, "avg_duration_s": 16.6,
                "duration_ms": 66500, "models": { "haiku": 2, "sonnet": 2 } })
    );
    assert_eq!(
        jan["trend"],
        json!({ "tasks_change": 2, "tasks_change_pct": 100.0, "tokens_change": 1400, "tokens_change_pct": 280.0 })
    );
    assert_eq!(row(&m, "2026-02")["tasks"], 0);
    assert_eq!(row(&m, "2026-03")["tasks"], 2);
    assert_eq!(row(&m, "2026-03")["tokens"]["total"], 200);

    // The same log read in UTC: B moves to January, H to 9 March.
    let u = usage(&t, "UTC", &["--period", "month"]);
    assert_eq!(u["index"]["rebuilt"], true);
    assert_eq!(u["index"]["reason"], "local time zone changed");
    assert_eq!(row(&u, "2025-12")["tasks"], 1);
    assert_eq!(row(&u, "2026-01")["tasks"], 5);
    let d = usage(&t, "UTC", &["--period", "day"]);
    assert_eq!(d["index"]["rebuilt"], false);
    assert_eq!(row(&d, "2026-01-01")["tasks"], 2);
    assert_eq!(row(&d, "2026-03-08")["tasks"], 1);
    assert_eq!(row(&d, "2026-03-09")["tasks"], 1);
}

#[test]
fn since_is_exact_within_a_day() {
    let t = with_history();
    // 07:00 in New York on 5 January: E (00:01) is before, F (10:00) after.
    let d = usage(&t, NY, &["--period", "day", "--since", "2026-01-05T12:00:00Z"]);
    assert_eq!(d["since"], "2026-01-05T12:00:00.000Z");
    assert_eq!(d["rows"][0]["period"], "2026-01-05");
    assert_eq!(d["rows"][0]["tasks"], 1);
    assert_eq!(d["rows"][0]["cancelled"], 1);
    assert_eq!(d["totals"]["tasks"], 3);
    assert_eq!(d["totals"]["tokens"]["total"], 200);
    // A local date means local midnight.
    let w = usage(&t, NY, &["--period", "week", "--since", "2026-01-01"]);
    assert_eq!(w["rows"][0]["period"], "2026-W01");
    assert_eq!(w["rows"][0]["tasks"], 2, "C and D, not B (the evening before)");
    t.cmd(&["usage", "--since", "yesterday-ish"])
        .env("TZ", NY)
        .run()
        .code(2);
}

#[test]
fn csv_and_table_carry_the_json_numbers() {
    let t = with_history();
    let j = usage(&t, NY, &["--period", "month"]);
    let csv = t
        .cmd(&["usage", "--period", "month", "--format", "csv"])
        .env("TZ", NY)
        .run()
        .code(0)
        .stdout
        .clone();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<String>> = lines.map(|l| l.split(',').map(str::to_string).collect()).collect();
    let jan = rows.iter().find(|r| r[0] == "2026-01").unwrap();
    let jj = row(&j, "2026-01");
    assert_eq!(jan[col("tasks")], jj["tasks"].to_string());
    assert_eq!(jan[col("succeeded")], "2");
    assert_eq!(jan[col("success_rate_pct")], "50.0");
    assert_eq!(jan[col("input_tokens")], "1150");
    assert_eq!(jan[col("output_tokens")], "700");
    assert_eq!(jan[col("cache_creation_tokens")], "25");
    assert_eq!(jan[col("cache_read_tokens")], "25");
    assert_eq!(jan[col("total_tokens")], "1900");
    assert_eq!(jan[col("avg_tokens_per_task")], "475.0");
    assert_eq!(jan[col("avg_duration_s")], "16.6");
    assert_eq!(jan[col("tasks_change_pct")], "100.0");
    assert_eq!(jan[col("models")], "haiku:2;sonnet:2");
    let total = rows.last().unwrap();
    assert_eq!(total[0], "total");
    assert_eq!(total[col("tasks")], "8");
    assert_eq!(total[col("total_tokens")], "2600");
    assert_eq!(rows.len(), j["rows"].as_array().unwrap().len() + 1);

    // Without a terminal: a plain table and a plain-text 30-day bar chart.
    let out = t
        .cmd(&["usage", "--period", "month"])
        .env("TZ", NY)
        .run()
        .code(0)
        .stdout
        .clone();
    let jan_line: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("2026-01 "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        jan_line,
        [
            "2026-01", "4", "50.0", "1150", "700", "25", "25", "1900", "475.0", "16.6", "+100.0%", "haiku:2",
            "sonnet:2"
        ]
    );
    let total_line: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("total "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        &total_line[..9],
        ["total", "8", "62.5", "1570", "930", "35", "65", "2600", "325.0"]
    );
    assert!(out.contains("Last 30 days"));
    assert!(out.is_ascii(), "no block characters without a terminal:\n{out}");
    assert_eq!(out.lines().filter(|l| l.trim_end().ends_with(" tokens")).count(), 30);
}

#[test]
fn index_follows_appends_and_rebuilds_when_missing_or_replaced() {
    let t = with_history();
    let paths = Paths::in_one_dir(t.path().to_path_buf());
    let first = usage(&t, NY, &[]);
    assert_eq!(first["index"]["rebuilt"], true);
    assert_eq!(first["index"]["reason"], "no index yet");
    let idx = t.file("usage.idx");
    assert!(idx.exists());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&idx).unwrap().permissions().mode() & 0o777, 0o600);

    // Nothing new: nothing read.
    let again = usage(&t, NY, &[]);
    assert_eq!(
        again["index"],
        json!({ "rebuilt": false, "reason": null, "bytes_read": 0 })
    );

    // A job finishing now: only the new bytes are read, and it counts today.
    let log = AuditLog::new(&paths);
    let before = log.read_head().unwrap().unwrap().len;
    log.append(
        claude_max_market::audit::Event::JobStarted,
        json!({ "job_id": "N", "model": "opus" }),
    )
    .unwrap();
    log.append(
        claude_max_market::audit::Event::JobCompleted,
        json!({ "job_id": "N", "model": "opus", "duration_ms": 7000,
                "usage": { "input_tokens": 10, "output_tokens": 20, "cache_creation_input_tokens": 30,
                           "cache_read_input_tokens": 40, "total_tokens": 100 },
                "cost_usd": 0.1, "num_turns": 1, "exit_code": 0 }),
    )
    .unwrap();
    let after = log.read_head().unwrap().unwrap().len;
    let inc = usage(&t, NY, &[]);
    assert_eq!(inc["index"]["rebuilt"], false);
    assert_eq!(inc["index"]["bytes_read"], after - before);
    assert_eq!(inc["totals"]["tasks"], 9);
    assert_eq!(inc["totals"]["tokens"]["total"], 2700);
    let today = inc["last_30_days"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        today,
        json!({ "date": today["date"], "tasks": 1, "succeeded": 1, "total_tokens": 100 })
    );
    assert_eq!(inc["rows"].as_array().unwrap().last().unwrap()["tasks"], 1);

    // Same answer as a rebuild from scratch.
    std::fs::remove_file(&idx).unwrap();
    let fresh = usage(&t, NY, &[]);
    assert_eq!(fresh["index"]["rebuilt"], true);
    assert_eq!(fresh["rows"], inc["rows"]);
    assert_eq!(fresh["totals"], inc["totals"]);

    // An unreadable index is rebuilt, not trusted.
    std::fs::write(&idx, b"{garbage").unwrap();
    let g = usage(&t, NY, &[]);
    assert_eq!(g["index"]["reason"], "index unreadable");
    assert_eq!(g["totals"], inc["totals"]);

    // A different log in the same place (new log id): rebuilt.
    std::fs::remove_file(t.file("audit.jsonl")).unwrap();
    std::fs::remove_file(t.file("audit.head")).unwrap();
    write_backdated_log_for_tests(
        &paths,
        job(
            "X",
            at("2026-02-02 12:00", -5),
            "job.completed",
            "opus",
            [1, 2, 3, 4],
            10,
        ),
    )
    .unwrap();
    let r = usage(&t, NY, &[]);
    assert_eq!(r["index"]["reason"], "audit log was replaced");
    assert_eq!(r["totals"]["tasks"], 1);
    assert_eq!(r["totals"]["tokens"]["total"], 10);
}

#[test]
fn an_empty_install_reports_no_tasks() {
    let t = Cmm::new();
    let d = usage(&t, NY, &[]);
    assert_eq!(d["rows"], json!([]));
    assert_eq!(d["totals"]["tasks"], 0);
    assert_eq!(d["last_30_days"].as_array().unwrap().len(), 30);
    t.cmd(&["usage"])
        .env("TZ", NY)
        .run()
        .code(0)
        .stdout_has("no finished tasks");
    t.cmd(&["usage", "--json"]).env("TZ", NY).run().code(0).json();
}

#[test]
fn an_edited_log_is_an_integrity_failure_not_a_report() {
    let t = with_history();
    usage(&t, NY, &[]);
    let log = t.read("audit.jsonl");
    let last = log.trim_end().rsplit('\n').next().unwrap().to_string();
    std::fs::write(
        t.file("audit.jsonl"),
        log.replace(&last, &last.replace("\"sonnet\"", "\"opus\"")),
    )
    .unwrap();
    t.cmd(&["usage"]).env("TZ", NY).run().code(5).stderr_has("audit verify");
}
