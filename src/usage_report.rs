//! The `usage` command's report: analytics from the audit log (tasks,
//! tokens, success rate, averages, model distribution and trend per local
//! day, ISO week or month). It only reads the log and keeps its own index;
//! it must not touch the caps ledger (`caps.rs`), which is what caps
//! are enforced against.
//!
//! A task is one terminal job event (`job.completed`, `job.failed`,
//! `job.killed`, `job.cancelled`); success is `job.completed`. A task belongs
//! to the local day of its terminal event's `ts`, in the zone chrono's
//! `Local` resolves (which follows `TZ`).
//!
//! Reading a million-line log on every call would take seconds, so
//! `usage.idx` keeps per-local-day aggregates plus a cursor into the log:
//! `{log_id, line_start, offset, hash}` where `hash` is the SHA-256 of the
//! line that ends at `offset`. The log is append-only and hash-chained, so if
//! that line is still there, unchanged, under the same log id, every byte
//! before it is too (anything else breaks the chain, which `audit verify`
//! reports), and only the bytes after the cursor need reading. Otherwise —
//! index missing, unreadable, from another format version, another log or
//! another time zone — it is rebuilt from scratch. Either way the answer
//! matches a full scan.
//!
//! `--since T` inside a day is exact: each day also records the byte range
//! its events span, and that one day is re-read and filtered by timestamp.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, Duration, FixedOffset, Local, NaiveDate, Offset, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{AuditError, AuditLog, Event, Head};
use crate::exit::{Exit, HasExit};
use crate::fsutil;
use crate::paths::Paths;

/// Bump when the index layout or the counting rules change: old indexes are
/// then rebuilt instead of misread.
const INDEX_VERSION: u32 = 1;
const INDEX_FILE: &str = "usage.idx";

/// Errors from building or reading the analytics.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl HasExit for ReportError {
    fn exit(&self) -> Exit {
        match self {
            ReportError::Audit(e) => e.exit(),
            ReportError::Io { .. } => Exit::Failed,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            ReportError::Audit(e) => e.hint(),
            ReportError::Io { .. } => Some("check that the data directory exists and is readable".into()),
        }
    }
}

/// Token counts by kind, as reported in a terminal event's `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    pub cache_creation: u64,
    pub cache_read: u64,
    pub total: u64,
}

impl Tokens {
    fn add(&mut self, o: &Tokens) {
        self.input += o.input;
        self.output += o.output;
        self.cache_creation += o.cache_creation;
        self.cache_read += o.cache_read;
        self.total += o.total;
    }
}

/// Aggregates for one local day (or, summed, for any span of days).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub tasks: u64,
    pub completed: u64,
    pub failed: u64,
    pub killed: u64,
    pub cancelled: u64,
    pub tokens: Tokens,
    pub duration_ms: u64,
    /// Tasks per model.
    pub models: BTreeMap<String, u64>,
}

impl Tally {
    pub fn add(&mut self, o: &Tally) {
        self.tasks += o.tasks;
        self.completed += o.completed;
        self.failed += o.failed;
        self.killed += o.killed;
        self.cancelled += o.cancelled;
        self.tokens.add(&o.tokens);
        self.duration_ms += o.duration_ms;
        for (m, n) in &o.models {
            *self.models.entry(m.clone()).or_default() += n;
        }
    }
}

/// One day in the index: its tally and the byte range its tasks span.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayEntry {
    #[serde(flatten)]
    pub tally: Tally,
    /// Offset of the first line of a task on this day.
    pub first: u64,
    /// Offset just past the last line of a task on this day.
    pub end: u64,
}

/// Where the index stopped reading.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub log_id: String,
    pub seq: u64,
    /// Start of the last line read.
    pub line_start: u64,
    /// Bytes read (just past the last line's `\n`).
    pub offset: u64,
    /// Hex SHA-256 of the last line read (without its `\n`).
    pub hash: String,
}

/// The on-disk index (`usage.idx`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub version: u32,
    /// Fingerprint of the local zone the days were bucketed in.
    pub zone: String,
    pub cursor: Cursor,
    pub days: BTreeMap<NaiveDate, DayEntry>,
}

/// How the index was brought up to date on this call.
#[derive(Debug, Clone, Serialize)]
pub struct Freshness {
    /// Rebuilt from the start of the log (with the reason), or caught up.
    pub rebuilt: bool,
    pub reason: Option<String>,
    /// Log bytes read on this call.
    pub bytes_read: u64,
}

/// The local time zone: a name for people and a fingerprint for the index.
#[derive(Debug, Clone)]
pub struct Zone {
    pub name: String,
    pub fingerprint: String,
}

impl Zone {
    /// The zone chrono's `Local` uses: `TZ` when set, else `/etc/localtime`.
    /// The fingerprint includes a hash of the zone file, so new zone rules
    /// (a tzdata update) also rebuild the day buckets.
    pub fn current() -> Zone {
        let tz = std::env::var("TZ").ok().filter(|t| !t.is_empty());
        let (name, file) = match tz {
            Some(t) => {
                let t = t.trim_start_matches(':').to_string();
                let file = if t.starts_with('/') {
                    PathBuf::from(&t)
                } else {
                    let dir = std::env::var_os("TZDIR").unwrap_or_else(|| "/usr/share/zoneinfo".into());
                    Path::new(&dir).join(&t)
                };
                (t, file)
            }
            None => {
                let link = fs::read_link("/etc/localtime").ok();
                let name = link
                    .as_ref()
                    .and_then(|l| l.to_str())
                    .and_then(|l| l.split_once("zoneinfo/").map(|(_, n)| n.to_string()))
                    .unwrap_or_else(|| "localtime".into());
                (name, PathBuf::from("/etc/localtime"))
            }
        };
        let digest = fs::read(&file)
            .map(|b| hex::encode(&Sha256::digest(&b)[..8]))
            .unwrap_or_else(|_| "-".into());
        Zone {
            fingerprint: format!("{name}|{digest}"),
            name,
        }
    }
}

/// The index file's path.
pub fn index_path(paths: &Paths) -> PathBuf {
    paths.data_dir.join(INDEX_FILE)
}

/// Load the index, bring it in step with the log (catching up or rebuilding)
/// and save it if it changed.
pub fn refresh(paths: &Paths, zone: &Zone) -> Result<(Index, Freshness), ReportError> {
    let log = AuditLog::new(paths);
    let head = log.quick_check()?;
    let path = index_path(paths);
    let (stored, why_not) = match fs::read(&path) {
        Ok(b) => match serde_json::from_slice::<Index>(&b) {
            Ok(ix) => (Some(ix), None),
            Err(_) => (None, Some("index unreadable")),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => (None, Some("no index yet")),
        Err(source) => return Err(ReportError::Io { path, source }),
    };
    let Some(head) = head else {
        // No log: nothing to count. Keep no index for a log that does not exist.
        return Ok((
            Index {
                version: INDEX_VERSION,
                zone: zone.fingerprint.clone(),
                ..Index::default()
            },
            Freshness {
                rebuilt: false,
                reason: None,
                bytes_read: 0,
            },
        ));
    };
    let mut file = File::open(log.log_path()).map_err(|source| ReportError::Io {
        path: log.log_path().to_path_buf(),
        source,
    })?;
    let io_err = |source| ReportError::Io {
        path: log.log_path().to_path_buf(),
        source,
    };
    let reuse = match stored {
        Some(ix) => match still_valid(&ix, &head, zone, &mut file).map_err(io_err)? {
            Ok(()) => Ok(ix),
            Err(why) => Err(why),
        },
        None => Err(why_not.unwrap_or("no index yet")),
    };
    let (mut index, fresh) = match reuse {
        Ok(ix) => (ix, None),
        Err(why) => (
            Index {
                version: INDEX_VERSION,
                zone: zone.fingerprint.clone(),
                cursor: Cursor {
                    log_id: head.log_id.clone(),
                    ..Cursor::default()
                },
                days: BTreeMap::new(),
            },
            Some(why),
        ),
    };
    let start = index.cursor.offset;
    if start < head.len || fresh.is_some() {
        catch_up(&mut index, &head, &mut file).map_err(io_err)?;
        fsutil::ensure_private_dir(&paths.data_dir).map_err(|source| ReportError::Io {
            path: paths.data_dir.clone(),
            source,
        })?;
        let bytes = serde_json::to_vec(&index).expect("index serialises");
        fsutil::atomic_write(&path, &bytes).map_err(|source| ReportError::Io { path, source })?;
    }
    Ok((
        index,
        Freshness {
            rebuilt: fresh.is_some(),
            reason: fresh.map(str::to_string),
            bytes_read: head.len - if fresh.is_some() { 0 } else { start },
        },
    ))
}

/// Can `ix` be extended, or must it be rebuilt (and why)?
fn still_valid(ix: &Index, head: &Head, zone: &Zone, file: &mut File) -> io::Result<Result<(), &'static str>> {
    if ix.version != INDEX_VERSION {
        return Ok(Err("index format changed"));
    }
    if ix.zone != zone.fingerprint {
        return Ok(Err("local time zone changed"));
    }
    let c = &ix.cursor;
    if c.log_id != head.log_id {
        return Ok(Err("audit log was replaced"));
    }
    if c.offset > head.len || c.seq > head.seq || c.line_start >= c.offset {
        return Ok(Err("audit log is shorter than the index"));
    }
    let mut line = vec![0u8; (c.offset - c.line_start) as usize];
    file.seek(SeekFrom::Start(c.line_start))?;
    if file.read_exact(&mut line).is_err() {
        return Ok(Err("audit log is shorter than the index"));
    }
    let body = line.strip_suffix(b"\n").unwrap_or(&line);
    if hex::encode(Sha256::digest(body)) != c.hash {
        return Ok(Err("audit log changed under the index"));
    }
    Ok(Ok(()))
}

/// Read the log from the cursor to the head, adding each task to its day.
fn catch_up(ix: &mut Index, head: &Head, file: &mut File) -> io::Result<()> {
    let start = ix.cursor.offset;
    file.seek(SeekFrom::Start(start))?;
    let mut reader = BufReader::with_capacity(1 << 20, file.take(head.len - start));
    let mut buf = Vec::with_capacity(1024);
    let mut offset = start;
    let mut last_start = ix.cursor.line_start;
    let mut zones = OffsetCache::default();
    let mut seq = ix.cursor.seq;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            if let Some(task) = parse_task(&buf[..n - 1]) {
                let day = zones.local_day(task.ts);
                let e = ix.days.entry(day).or_insert_with(|| DayEntry {
                    first: offset,
                    ..DayEntry::default()
                });
                e.tally.add_task(&task);
                e.first = e.first.min(offset);
                e.end = e.end.max(offset + n as u64);
            }
            seq = read_seq(&buf).unwrap_or(seq);
            last_start = offset;
        }
        offset += n as u64;
    }
    if offset > start {
        // Hash only the one line the cursor names, not every line.
        let mut line = vec![0u8; (offset - last_start) as usize];
        let f = reader.into_inner().into_inner();
        f.seek(SeekFrom::Start(last_start))?;
        f.read_exact(&mut line)?;
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        ix.cursor = Cursor {
            log_id: head.log_id.clone(),
            seq,
            line_start: last_start,
            offset,
            hash: hex::encode(Sha256::digest(body)),
        };
    }
    Ok(())
}

/// Re-read one day's byte range and tally only its tasks at or after `since`.
fn tally_day_since(
    paths: &Paths,
    day: NaiveDate,
    entry: &DayEntry,
    since: DateTime<Utc>,
) -> Result<Tally, ReportError> {
    let path = paths.audit_log();
    let io_err = |source| ReportError::Io {
        path: path.clone(),
        source,
    };
    let mut file = File::open(&path).map_err(io_err)?;
    file.seek(SeekFrom::Start(entry.first)).map_err(io_err)?;
    let mut reader = BufReader::with_capacity(1 << 16, file.take(entry.end - entry.first));
    let mut buf = Vec::with_capacity(1024);
    let mut zones = OffsetCache::default();
    let mut t = Tally::default();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        if let Some(task) = parse_task(body) {
            if task.ts >= since && zones.local_day(task.ts) == day {
                t.add_task(&task);
            }
        }
    }
    Ok(t)
}

fn read_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"v\":1,\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// The fields of a terminal job event that analytics use.
#[derive(Debug)]
struct Task {
    ts: DateTime<Utc>,
    outcome: Outcome,
    model: String,
    duration_ms: u64,
    tokens: Tokens,
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Completed,
    Failed,
    Killed,
    Cancelled,
}

#[derive(Deserialize)]
struct RawTask<'a> {
    ts: &'a str,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    duration_ms: Option<u64>,
    #[serde(default)]
    usage: Option<RawUsage>,
}

#[derive(Deserialize, Default)]
struct RawUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: u64,
    #[serde(default)]
    total_tokens: Option<u64>,
}

/// Parse a line if it is a terminal job event. Most lines are not, and are
/// rejected by looking at the bytes where `"event"` sits, without a parse.
fn parse_task(line: &[u8]) -> Option<Task> {
    // `{"v":1,"seq":N,"ts":"<24 chars>","event":"...`: the event name starts
    // within the first ~70 bytes; look a little further to be safe.
    let window = &line[..line.len().min(96)];
    let at = memchr::memmem::find(window, b"\"event\":\"job.")? + 9;
    let rest = &line[at..];
    let (_, outcome) = [
        (Event::JobCompleted, Outcome::Completed),
        (Event::JobFailed, Outcome::Failed),
        (Event::JobKilled, Outcome::Killed),
        (Event::JobCancelled, Outcome::Cancelled),
    ]
    .into_iter()
    .find(|(e, _)| {
        rest.strip_prefix(e.name().as_bytes())
            .is_some_and(|r| r.first() == Some(&b'"'))
    })?;
    let raw: RawTask = serde_json::from_slice(line).ok()?;
    let ts = DateTime::parse_from_rfc3339(raw.ts).ok()?.with_timezone(&Utc);
    let u = raw.usage.unwrap_or_default();
    let tokens = Tokens {
        input: u.input_tokens,
        output: u.output_tokens,
        cache_creation: u.cache_creation_input_tokens,
        cache_read: u.cache_read_input_tokens,
        total: u
            .total_tokens
            .unwrap_or(u.input_tokens + u.output_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens),
    };
    Some(Task {
        ts,
        outcome,
        model: raw.model.filter(|m| !m.is_empty()).unwrap_or_else(|| "unknown".into()),
        duration_ms: raw.duration_ms.unwrap_or(0),
        tokens,
    })
}

impl Tally {
    fn add_task(&mut self, t: &Task) {
        self.tasks += 1;
        match t.outcome {
            Outcome::Completed => self.completed += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Killed => self.killed += 1,
            Outcome::Cancelled => self.cancelled += 1,
        }
        self.tokens.add(&t.tokens);
        self.duration_ms += t.duration_ms;
        if let Some(n) = self.models.get_mut(&t.model) {
            *n += 1;
        } else {
            self.models.insert(t.model.clone(), 1);
        }
    }
}

/// Local-day lookup with the zone offset cached per 15 minutes of UTC: zone
/// transitions fall on quarter hours, and log times arrive in order, so
/// nearly every lookup is a hit.
#[derive(Default)]
struct OffsetCache {
    bucket: i64,
    offset: Option<FixedOffset>,
}

impl OffsetCache {
    fn local_day(&mut self, ts: DateTime<Utc>) -> NaiveDate {
        let bucket = ts.timestamp().div_euclid(900);
        let off = match self.offset {
            Some(o) if self.bucket == bucket => o,
            _ => {
                let o = Local.offset_from_utc_datetime(&ts.naive_utc()).fix();
                self.bucket = bucket;
                self.offset = Some(o);
                o
            }
        };
        (ts + Duration::seconds(off.local_minus_utc() as i64)).date_naive()
    }
}

/// The local day of an instant.
pub fn local_day(ts: DateTime<Utc>) -> NaiveDate {
    ts.with_timezone(&Local).date_naive()
}

/// How rows are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Week,
    Month,
}

impl Period {
    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// First day of the period holding `d`.
    pub fn start_of(self, d: NaiveDate) -> NaiveDate {
        match self {
            Period::Day => d,
            Period::Week => d - Duration::days(d.weekday().num_days_from_monday() as i64),
            Period::Month => d.with_day(1).expect("day 1 exists"),
        }
    }

    /// First day of the next period after the one starting at `start`.
    pub fn next(self, start: NaiveDate) -> NaiveDate {
        match self {
            Period::Day => start + Duration::days(1),
            Period::Week => start + Duration::days(7),
            Period::Month => start.checked_add_months(chrono::Months::new(1)).expect("in range"),
        }
    }

    /// `2026-11-21`, `2026-W47` (ISO week), `2026-11`.
    pub fn label(self, start: NaiveDate) -> String {
        match self {
            Period::Day => start.format("%Y-%m-%d").to_string(),
            Period::Week => {
                let w = start.iso_week();
                format!("{}-W{:02}", w.year(), w.week())
            }
            Period::Month => start.format("%Y-%m").to_string(),
        }
    }
}

/// Figures for one period (or the whole range).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub tasks: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub killed: u64,
    pub cancelled: u64,
    /// Percent of tasks that completed, one decimal; null with no tasks.
    pub success_rate_pct: Option<f64>,
    pub tokens: Tokens,
    /// Total tokens per task, one decimal; null with no tasks.
    pub avg_tokens_per_task: Option<f64>,
    /// Seconds per task, one decimal; null with no tasks.
    pub avg_duration_s: Option<f64>,
    pub duration_ms: u64,
    /// Tasks per model.
    pub models: BTreeMap<String, u64>,
}

impl Stats {
    pub fn from_tally(t: &Tally) -> Stats {
        let per_task = |x: f64| (t.tasks > 0).then(|| round1(x / t.tasks as f64));
        Stats {
            tasks: t.tasks,
            succeeded: t.completed,
            failed: t.failed,
            killed: t.killed,
            cancelled: t.cancelled,
            success_rate_pct: per_task(t.completed as f64 * 100.0),
            tokens: t.tokens,
            avg_tokens_per_task: per_task(t.tokens.total as f64),
            avg_duration_s: per_task(t.duration_ms as f64 / 1000.0),
            duration_ms: t.duration_ms,
            models: t.models.clone(),
        }
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Change against the previous period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trend {
    pub tasks_change: i64,
    /// Percent change in tasks, one decimal; null when the previous period had none.
    pub tasks_change_pct: Option<f64>,
    pub tokens_change: i64,
    /// Percent change in total tokens, one decimal; null when the previous period had none.
    pub tokens_change_pct: Option<f64>,
}

impl Trend {
    fn between(prev: &Tally, cur: &Tally) -> Trend {
        let pct = |p: u64, c: u64| (p > 0).then(|| round1((c as f64 - p as f64) * 100.0 / p as f64));
        Trend {
            tasks_change: cur.tasks as i64 - prev.tasks as i64,
            tasks_change_pct: pct(prev.tasks, cur.tasks),
            tokens_change: cur.tokens.total as i64 - prev.tokens.total as i64,
            tokens_change_pct: pct(prev.tokens.total, cur.tokens.total),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeriodRow {
    /// `2026-11-21`, `2026-W47` or `2026-11`.
    pub period: String,
    /// First and last local day of the period.
    pub start: NaiveDate,
    pub end: NaiveDate,
    #[serde(flatten)]
    pub stats: Stats,
    /// Against the row before; null on the first row.
    pub trend: Option<Trend>,
}

/// One day of the 30-day chart.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DayPoint {
    pub date: NaiveDate,
    pub tasks: u64,
    pub succeeded: u64,
    pub total_tokens: u64,
}

/// Everything `usage` shows.
#[derive(Debug, Clone, Serialize)]
pub struct UsageReport {
    pub period: Period,
    pub time_zone: String,
    /// Only tasks at or after this instant (RFC 3339), when given.
    pub since: Option<String>,
    pub generated_at: String,
    /// One row per period, oldest first, with no gaps, up to the current one.
    pub rows: Vec<PeriodRow>,
    pub totals: Stats,
    /// Local today and the 29 days before it, oldest first (ignores `since`).
    pub last_30_days: Vec<DayPoint>,
    pub index: Freshness,
}

/// Build the report: refresh the index, then sum days into periods.
pub fn report(
    paths: &Paths,
    period: Period,
    since: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<UsageReport, ReportError> {
    let zone = Zone::current();
    let (index, freshness) = refresh(paths, &zone)?;
    let today = local_day(now);

    // Days in range with their tallies; the day holding `since` is re-read.
    let since_day = since.map(local_day);
    let mut days: BTreeMap<NaiveDate, Tally> = BTreeMap::new();
    for (d, e) in &index.days {
        match since_day {
            Some(sd) if *d < sd => continue,
            Some(sd) if *d == sd => {
                let since = since.expect("since_day implies since");
                days.insert(*d, tally_day_since(paths, *d, e, since)?);
            }
            _ => {
                days.insert(*d, e.tally.clone());
            }
        }
    }

    // Rows start no earlier than the first recorded day: `--since
    // 0001-01-01` must not print (and hold) 740,000 empty days.
    let earliest = index.days.keys().next().copied().unwrap_or(today).min(today);
    let first = match since_day {
        Some(sd) => Some(sd.max(earliest)),
        None => days.keys().next().copied(),
    };
    let mut rows = Vec::new();
    let mut totals = Tally::default();
    if let Some(first) = first {
        let last = days.keys().next_back().copied().unwrap_or(today).max(today);
        let mut start = period.start_of(first);
        let mut prev: Option<Tally> = None;
        while start <= last {
            let next = period.next(start);
            let mut t = Tally::default();
            for (_, dt) in days.range(start..next) {
                t.add(dt);
            }
            totals.add(&t);
            rows.push(PeriodRow {
                period: period.label(start),
                start,
                end: next - Duration::days(1),
                stats: Stats::from_tally(&t),
                trend: prev.as_ref().map(|p| Trend::between(p, &t)),
            });
            prev = Some(t);
            start = next;
        }
    }

    let last_30_days = (0..30)
        .rev()
        .map(|back| {
            let d = today - Duration::days(back);
            let t = index.days.get(&d).map(|e| &e.tally);
            DayPoint {
                date: d,
                tasks: t.map_or(0, |t| t.tasks),
                succeeded: t.map_or(0, |t| t.completed),
                total_tokens: t.map_or(0, |t| t.tokens.total),
            }
        })
        .collect();

    Ok(UsageReport {
        period,
        time_zone: zone.name,
        since: since.map(|s| s.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        generated_at: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        rows,
        totals: Stats::from_tally(&totals),
        last_30_days,
        index: freshness,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_terminal_job_events_are_tasks() {
        let line = br#"{"v":1,"seq":3,"ts":"2026-01-02T03:04:05.000Z","event":"job.completed","job_id":"j","model":"m","duration_ms":1500,"usage":{"input_tokens":1,"output_tokens":2,"cache_creation_input_tokens":3,"cache_read_input_tokens":4,"total_tokens":10},"prev":"00"}"#;
        let t = parse_task(line).unwrap();
        assert_eq!(t.tokens.total, 10);
        assert_eq!(t.duration_ms, 1500);
        assert!(matches!(t.outcome, Outcome::Completed));
        let started =
            br#"{"v":1,"seq":3,"ts":"2026-01-02T03:04:05.000Z","event":"job.started","job_id":"j","prev":"00"}"#;
        assert!(parse_task(started).is_none());
        let other = br#"{"v":1,"seq":3,"ts":"2026-01-02T03:04:05.000Z","event":"config.set","note":"\"event\":\"job.completed\"","prev":"00"}"#;
        assert!(parse_task(other).is_none());
    }

    #[test]
    fn periods_label_iso_weeks_and_months() {
        let d = NaiveDate::from_ymd_opt(2027, 1, 1).unwrap(); // a Friday in ISO week 2026-W53
        assert_eq!(Period::Week.start_of(d), NaiveDate::from_ymd_opt(2026, 12, 28).unwrap());
        assert_eq!(Period::Week.label(Period::Week.start_of(d)), "2026-W53");
        assert_eq!(Period::Month.label(Period::Month.start_of(d)), "2027-01");
        assert_eq!(
            Period::Month.next(NaiveDate::from_ymd_opt(2026, 12, 1).unwrap()),
            NaiveDate::from_ymd_opt(2027, 1, 1).unwrap()
        );
    }

    #[test]
    fn trend_is_relative_to_the_previous_period() {
        let a = Tally {
            tasks: 4,
            ..Tally::default()
        };
        let b = Tally {
            tasks: 5,
            ..Tally::default()
        };
        let t = Trend::between(&a, &b);
        assert_eq!((t.tasks_change, t.tasks_change_pct), (1, Some(25.0)));
        assert_eq!(Trend::between(&Tally::default(), &b).tasks_change_pct, None);
    }
}
