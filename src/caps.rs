//! The caps ledger: caps and usage windows, reserve / commit / release
//! under one lock (used by jobs, `limits`, `status` and the provider). The
//! `usage` command's report from the audit log is `usage_report`;
//! this module must not read the audit log, and nothing else may write
//! `usage.json`.
//!
//! `usage.json` holds per-local-day totals (kept for 70 days, enough for any
//! window) and the open reservations. Every check-and-reserve happens under
//! `.usage.lock`, so N processes racing against a cap of K get exactly K
//! reservations (invariant 4). A reservation counts against every window as
//! one task plus the job's token and cost budget (at most
//! `maxTokensPerTask` / `maxCostPerTask`) until it is committed with the
//! real usage or released.
//!
//! What the caps count: token caps count *fresh* tokens (input, cache
//! creation and output), the part of a job that grows with its work. Cache
//! reads (Claude Code re-reads its ~12,000-token system prompt and the
//! history on every turn, at a tenth of the input price) are kept apart and
//! shown next to them; the cost caps (from the `total_cost_usd` Claude Code
//! reports) include them. Costs are counted in whole micro-dollars.
//!
//! A reservation remembers its process (pid and start time); one whose
//! process is gone is reclaimed on the next locked operation. Reclaiming is
//! pessimistic: the dead job is counted as one task with its full reserved
//! tokens, because it may have spent them before it died.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Duration, Local, NaiveDate, TimeZone};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::exit::{Exit, HasExit};
use crate::fsutil::{self, FileLock};
use crate::paths::Paths;

const KEEP_DAYS: i64 = 70;

/// Below this, a per-job token cap cannot fit even one real Claude Code
/// request (~12,000 fresh tokens of system prompt and tool definitions).
pub const MIN_USEFUL_TASK_TOKENS: u64 = 15_000;

/// Totals for one local calendar day.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DayUsage {
    pub tasks: u64,
    /// Fresh tokens: input + cache creation + output.
    pub tokens: u64,
    /// Cache reads, shown apart (not counted by the token caps).
    #[serde(default)]
    pub cache_read_tokens: u64,
    /// Cost in micro-dollars (reported by Claude Code, or estimated for a
    /// job that ended without its result).
    #[serde(default)]
    pub cost_micros: u64,
}

/// What one job may spend: reserved up front.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Fresh tokens.
    pub tokens: u64,
    /// Micro-dollars (0 when there is no cost cap for the job).
    pub cost_micros: u64,
}

/// What one job spent, as the caps count it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Spent {
    pub tokens: u64,
    pub cache_read_tokens: u64,
    pub cost_micros: u64,
}

/// Dollars as whole micro-dollars (negative and non-finite amounts are 0).
pub fn usd_to_micros(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e6).round() as u64
    } else {
        0
    }
}

/// Micro-dollars as dollars.
pub fn micros_to_usd(micros: u64) -> f64 {
    micros as f64 / 1e6
}

/// An open claim on capacity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    pub id: String,
    pub job_id: String,
    pub pid: u32,
    /// Process start time (clock ticks since boot) to survive pid reuse.
    #[serde(default)]
    pub pid_start: Option<u64>,
    pub created: DateTime<Local>,
    /// Local day the reservation (and its usage) counts for.
    pub day: NaiveDate,
    pub tokens: u64,
    #[serde(default)]
    pub cost_micros: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    #[serde(default)]
    days: BTreeMap<NaiveDate, DayUsage>,
    #[serde(default)]
    reservations: Vec<Reservation>,
}

/// The caps in force: the `limits.*` settings. Daily tokens are fresh
/// tokens (cache reads are not counted; see the module doc); amounts are
/// US dollars.
pub type Caps = crate::config::Limits;

impl Caps {
    pub fn from_config(cfg: &Config) -> Caps {
        cfg.settings().limits.clone()
    }

    /// The budget a job reserves when it asks for nothing smaller.
    pub fn full_budget(&self) -> Budget {
        Budget {
            tokens: self.max_tokens_per_task,
            cost_micros: self.max_cost_per_task.map(usd_to_micros).unwrap_or(0),
        }
    }
}

/// A usage window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    Day,
    Week,
    Month,
}

impl Window {
    pub const ALL: [Window; 3] = [Window::Day, Window::Week, Window::Month];

    pub fn name(self) -> &'static str {
        match self {
            Window::Day => "day",
            Window::Week => "week",
            Window::Month => "month",
        }
    }

    /// Does `day` fall in the same window as `today`?
    pub fn contains(self, today: NaiveDate, day: NaiveDate) -> bool {
        match self {
            Window::Day => day == today,
            Window::Week => day.iso_week() == today.iso_week(),
            Window::Month => day.year() == today.year() && day.month() == today.month(),
        }
    }

    /// First local day of the next window.
    pub fn next_start(self, today: NaiveDate) -> NaiveDate {
        match self {
            Window::Day => today + Duration::days(1),
            Window::Week => today + Duration::days(7 - today.weekday().num_days_from_monday() as i64),
            Window::Month => {
                let (y, m) = if today.month() == 12 {
                    (today.year() + 1, 1)
                } else {
                    (today.year(), today.month() + 1)
                };
                NaiveDate::from_ymd_opt(y, m, 1).expect("first of a month exists")
            }
        }
    }

    /// When this window resets, as a local time (midnight; DST-safe).
    pub fn resets_at(self, today: NaiveDate) -> DateTime<Local> {
        local_midnight(self.next_start(today))
    }

    fn task_cap(self, caps: &Caps) -> Option<u64> {
        match self {
            Window::Day => Some(caps.daily_tasks),
            Window::Week => caps.weekly_tasks,
            Window::Month => caps.monthly_tasks,
        }
    }

    fn token_cap(self, caps: &Caps) -> Option<u64> {
        match self {
            Window::Day => Some(caps.daily_tokens),
            Window::Week => caps.weekly_tokens,
            Window::Month => caps.monthly_tokens,
        }
    }

    fn cost_cap(self, caps: &Caps) -> Option<f64> {
        match self {
            Window::Day => caps.daily_cost_usd,
            Window::Week => caps.weekly_cost_usd,
            Window::Month => caps.monthly_cost_usd,
        }
    }
}

fn local_midnight(day: NaiveDate) -> DateTime<Local> {
    let naive = day.and_hms_opt(0, 0, 0).expect("midnight exists");
    Local
        .from_local_datetime(&naive)
        .earliest()
        // A DST gap at midnight: the day starts an hour later.
        .unwrap_or_else(|| {
            Local
                .from_local_datetime(&(naive + Duration::hours(1)))
                .earliest()
                .expect("1am exists")
        })
}

/// Usage errors.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("{cap} reached: {used} of {limit} used{}", resets.map(|r| format!("; resets {}", r.format("%Y-%m-%d %H:%M %Z"))).unwrap_or_default())]
    CapReached {
        cap: String,
        used: u64,
        limit: u64,
        resets: Option<DateTime<Local>>,
    },
    #[error("{cap} reached: ${used:.2} of ${limit:.2} used{}", resets.map(|r| format!("; resets {}", r.format("%Y-%m-%d %H:%M %Z"))).unwrap_or_default())]
    CostCapReached {
        cap: String,
        used: f64,
        limit: f64,
        resets: Option<DateTime<Local>>,
    },
    #[error("cannot update {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {msg}")]
    Corrupt { path: std::path::PathBuf, msg: String },
}

impl HasExit for CapsError {
    fn exit(&self) -> Exit {
        match self {
            CapsError::CapReached { .. } | CapsError::CostCapReached { .. } => Exit::Refused,
            CapsError::Io { .. } => Exit::Failed,
            CapsError::Corrupt { .. } => Exit::Integrity,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            CapsError::CapReached { cap, .. } if cap.starts_with("concurrent") => Some(
                "wait for the running job to finish, or raise the cap with `claude-max-market limits --concurrent N`"
                    .into(),
            ),
            CapsError::CapReached { .. } => {
                Some("wait for the window to reset, or raise the cap with `claude-max-market limits`".into())
            }
            CapsError::CostCapReached { .. } => Some(
                "wait for the window to reset, lower this job's `--max-budget-usd`, or raise the cap with `claude-max-market limits --daily-cost USD`".into(),
            ),
            CapsError::Corrupt { path, .. } => Some(format!(
                "move it aside (`mv {} {}.bad`); usage history since then is lost, the audit log still has it",
                path.display(),
                path.display()
            )),
            _ => None,
        }
    }
}

/// One window's usage against its caps.
#[derive(Debug, Clone, Serialize)]
pub struct WindowUsage {
    pub window: Window,
    pub tasks: u64,
    /// Fresh tokens (what the token caps count).
    pub tokens: u64,
    /// Cache reads, shown apart.
    pub cache_read_tokens: u64,
    pub cost_usd: f64,
    pub reserved_tasks: u64,
    pub reserved_tokens: u64,
    pub reserved_cost_usd: f64,
    pub task_cap: Option<u64>,
    pub token_cap: Option<u64>,
    pub cost_cap_usd: Option<f64>,
    pub resets_at: DateTime<Local>,
    #[serde(skip)]
    cost_micros: u64,
    #[serde(skip)]
    reserved_cost_micros: u64,
}

/// Point-in-time view for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub windows: Vec<WindowUsage>,
    pub reservations: Vec<ReservationView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReservationView {
    #[serde(flatten)]
    pub reservation: Reservation,
    /// The owning process is gone; the next locked operation reclaims it.
    pub stale: bool,
}

/// A reservation someone holds: released on drop unless committed,
/// released or handed over first, so no path forgets it.
#[derive(Debug)]
pub struct HeldReservation {
    ledger: Ledger,
    id: Option<String>,
}

impl HeldReservation {
    /// Count what the job really spent against it.
    pub fn commit(&mut self, spent: &Spent) -> Result<(), CapsError> {
        match self.id.take() {
            Some(id) => self.ledger.commit(&id, spent, Local::now()).map(drop),
            None => Ok(()),
        }
    }
    pub fn release(&mut self) -> Result<(), CapsError> {
        match self.id.take() {
            Some(id) => self.ledger.release(&id, Local::now()).map(drop),
            None => Ok(()),
        }
    }
    /// Give the reservation to whoever settles it next (its id).
    pub fn hand_over(mut self) -> Option<String> {
        self.id.take()
    }
}

impl Drop for HeldReservation {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// Handle on the usage store.
#[derive(Debug, Clone)]
pub struct Ledger {
    file: std::path::PathBuf,
    lock: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Ledger {
    /// Hold the reservation `id` (see [`HeldReservation`]).
    pub fn held(&self, id: String) -> HeldReservation {
        HeldReservation {
            ledger: self.clone(),
            id: Some(id),
        }
    }

    pub fn new(paths: &Paths) -> Ledger {
        Ledger {
            file: paths.usage_file(),
            lock: paths.usage_lock(),
            dir: paths.data_dir.clone(),
        }
    }

    fn io(&self, source: std::io::Error) -> CapsError {
        CapsError::Io {
            path: self.file.clone(),
            source,
        }
    }

    fn load(&self) -> Result<State, CapsError> {
        match std::fs::read(&self.file) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| CapsError::Corrupt {
                path: self.file.clone(),
                msg: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(self.io(e)),
        }
    }

    fn save(&self, state: &State) -> Result<(), CapsError> {
        let bytes = serde_json::to_vec(state).expect("state serialises");
        fsutil::atomic_write(&self.file, &bytes).map_err(|e| self.io(e))
    }

    /// Run `f` on the state under the lock, then save.
    fn locked<T>(
        &self,
        now: DateTime<Local>,
        f: impl FnOnce(&mut State) -> Result<T, CapsError>,
    ) -> Result<(T, Vec<Reservation>), CapsError> {
        fsutil::ensure_private_dir(&self.dir).map_err(|e| self.io(e))?;
        let _lock = FileLock::exclusive(&self.lock).map_err(|e| self.io(e))?;
        // Temporaries of writers killed before their rename (the config
        // edit sweeps the config dir the same way).
        fsutil::sweep_stale_temps(&self.dir, fsutil::STALE_TEMP_AGE);
        let mut state = self.load()?;
        let reclaimed = reclaim(&mut state);
        let cutoff = now.date_naive() - Duration::days(KEEP_DAYS);
        state.days.retain(|d, _| *d >= cutoff);
        let out = f(&mut state)?;
        self.save(&state)?;
        Ok((out, reclaimed))
    }

    /// Reserve one task and `budget` against every cap, or say which cap
    /// is reached. Also returns reservations reclaimed from dead processes
    /// (to audit).
    pub fn reserve(
        &self,
        caps: &Caps,
        job_id: &str,
        budget: Budget,
        now: DateTime<Local>,
    ) -> Result<(Reservation, Vec<Reservation>), CapsError> {
        self.locked(now, |state| {
            let today = now.date_naive();
            if state.reservations.len() as u64 >= caps.concurrent_jobs {
                return Err(CapsError::CapReached {
                    cap: "concurrent jobs cap (limits.concurrentJobs)".into(),
                    used: state.reservations.len() as u64,
                    limit: caps.concurrent_jobs,
                    resets: None,
                });
            }
            for w in Window::ALL {
                let u = window_usage(state, caps, w, today);
                if let Some(cap) = u.task_cap {
                    if u.tasks + u.reserved_tasks + 1 > cap {
                        return Err(CapsError::CapReached {
                            cap: format!("{} task cap (limits.{}Tasks)", adjective(w), adjective(w)),
                            used: u.tasks + u.reserved_tasks,
                            limit: cap,
                            resets: Some(u.resets_at),
                        });
                    }
                }
                if let Some(cap) = u.token_cap {
                    if u.tokens + u.reserved_tokens + budget.tokens > cap {
                        return Err(CapsError::CapReached {
                            cap: format!(
                                "{} token cap (limits.{}Tokens, fresh tokens; this job reserves {})",
                                adjective(w),
                                adjective(w),
                                budget.tokens
                            ),
                            used: u.tokens + u.reserved_tokens,
                            limit: cap,
                            resets: Some(u.resets_at),
                        });
                    }
                }
                if let Some(cap) = u.cost_cap_usd {
                    let cap_micros = usd_to_micros(cap);
                    if u.cost_micros + u.reserved_cost_micros + budget.cost_micros > cap_micros {
                        return Err(CapsError::CostCapReached {
                            cap: format!(
                                "{} cost cap (limits.{}CostUsd; this job reserves ${:.2})",
                                adjective(w),
                                adjective(w),
                                micros_to_usd(budget.cost_micros)
                            ),
                            used: micros_to_usd(u.cost_micros + u.reserved_cost_micros),
                            limit: cap,
                            resets: Some(u.resets_at),
                        });
                    }
                }
            }
            let pid = std::process::id();
            let r = Reservation {
                id: hex::encode(rand::random::<[u8; 8]>()),
                job_id: job_id.to_string(),
                pid,
                pid_start: process_start(pid),
                created: now,
                day: today,
                tokens: budget.tokens,
                cost_micros: budget.cost_micros,
            };
            state.reservations.push(r.clone());
            Ok(r)
        })
    }

    /// Replace a reservation with real usage: one task and what it spent.
    pub fn commit(&self, reservation_id: &str, spent: &Spent, now: DateTime<Local>) -> Result<bool, CapsError> {
        self.locked(now, |state| {
            let Some(i) = state.reservations.iter().position(|r| r.id == reservation_id) else {
                return Ok(false);
            };
            let r = state.reservations.remove(i);
            let d = state.days.entry(r.day).or_default();
            d.tasks += 1;
            d.tokens += spent.tokens;
            d.cache_read_tokens += spent.cache_read_tokens;
            d.cost_micros += spent.cost_micros;
            Ok(true)
        })
        .map(|(found, _)| found)
    }

    /// Drop a reservation without counting it (the job never started).
    pub fn release(&self, reservation_id: &str, now: DateTime<Local>) -> Result<bool, CapsError> {
        self.locked(now, |state| {
            let before = state.reservations.len();
            state.reservations.retain(|r| r.id != reservation_id);
            Ok(before != state.reservations.len())
        })
        .map(|(found, _)| found)
    }

    /// Read-only view (no lock needed: the file is replaced atomically).
    pub fn snapshot(&self, caps: &Caps, now: DateTime<Local>) -> Result<Snapshot, CapsError> {
        let state = self.load()?;
        let today = now.date_naive();
        Ok(Snapshot {
            windows: Window::ALL
                .iter()
                .map(|w| window_usage(&state, caps, *w, today))
                .collect(),
            reservations: state
                .reservations
                .iter()
                .map(|r| ReservationView {
                    reservation: r.clone(),
                    stale: !alive(r),
                })
                .collect(),
        })
    }
}

fn adjective(w: Window) -> &'static str {
    match w {
        Window::Day => "daily",
        Window::Week => "weekly",
        Window::Month => "monthly",
    }
}

fn window_usage(state: &State, caps: &Caps, w: Window, today: NaiveDate) -> WindowUsage {
    let mut used = DayUsage::default();
    for (day, u) in &state.days {
        if w.contains(today, *day) {
            used.tasks += u.tasks;
            used.tokens += u.tokens;
            used.cache_read_tokens += u.cache_read_tokens;
            used.cost_micros += u.cost_micros;
        }
    }
    let (mut rt, mut rtok, mut rcost) = (0, 0, 0);
    for r in &state.reservations {
        if w.contains(today, r.day) {
            rt += 1;
            rtok += r.tokens;
            rcost += r.cost_micros;
        }
    }
    WindowUsage {
        window: w,
        tasks: used.tasks,
        tokens: used.tokens,
        cache_read_tokens: used.cache_read_tokens,
        cost_usd: micros_to_usd(used.cost_micros),
        reserved_tasks: rt,
        reserved_tokens: rtok,
        reserved_cost_usd: micros_to_usd(rcost),
        task_cap: w.task_cap(caps),
        token_cap: w.token_cap(caps),
        cost_cap_usd: w.cost_cap(caps),
        resets_at: w.resets_at(today),
        cost_micros: used.cost_micros,
        reserved_cost_micros: rcost,
    }
}

/// Remove reservations whose process is gone, counting them pessimistically.
fn reclaim(state: &mut State) -> Vec<Reservation> {
    let (dead, live): (Vec<_>, Vec<_>) = std::mem::take(&mut state.reservations)
        .into_iter()
        .partition(|r| !alive(r));
    state.reservations = live;
    for r in &dead {
        let d = state.days.entry(r.day).or_default();
        d.tasks += 1;
        d.tokens += r.tokens;
        d.cost_micros += r.cost_micros;
    }
    dead
}

fn alive(r: &Reservation) -> bool {
    if r.pid == std::process::id() {
        return true;
    }
    match (process_start(r.pid), r.pid_start) {
        (Some(now), Some(then)) => now == then,
        (None, _) => {
            // No /proc entry: fall back to a signal-0 probe (non-Linux).
            // SAFETY: kill with signal 0 only checks for existence.
            !std::path::Path::new("/proc/self").exists() && unsafe { libc::kill(r.pid as i32, 0) } == 0
        }
        (Some(_), None) => true,
    }
}

/// Start time of a process in clock ticks since boot (Linux `/proc`).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (comm) may contain spaces and parentheses: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    // After comm, fields start at 3 (state); starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(daily: u64) -> Caps {
        Caps {
            daily_tasks: daily,
            daily_tokens: 1_000_000,
            weekly_tasks: None,
            weekly_tokens: None,
            monthly_tasks: None,
            monthly_tokens: None,
            max_tokens_per_task: 100,
            max_turns_per_task: 10,
            max_cost_per_task: Some(1.0),
            daily_cost_usd: Some(2.5),
            weekly_cost_usd: None,
            monthly_cost_usd: None,
            concurrent_jobs: 10,
        }
    }

    #[test]
    fn windows_follow_local_calendar() {
        let d = NaiveDate::from_ymd_opt(2026, 12, 31).unwrap(); // Thursday
        assert_eq!(Window::Day.next_start(d), NaiveDate::from_ymd_opt(2027, 1, 1).unwrap());
        assert_eq!(
            Window::Month.next_start(d),
            NaiveDate::from_ymd_opt(2027, 1, 1).unwrap()
        );
        assert_eq!(Window::Week.next_start(d), NaiveDate::from_ymd_opt(2027, 1, 4).unwrap());
        // ISO week 53 of 2026 spans into January 2027.
        assert!(Window::Week.contains(d, NaiveDate::from_ymd_opt(2027, 1, 3).unwrap()));
        assert!(!Window::Month.contains(d, NaiveDate::from_ymd_opt(2027, 1, 3).unwrap()));
    }

    #[test]
    fn reserve_commit_release() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::new(&Paths::in_one_dir(dir.path().into()));
        let now = Local::now();
        let full = caps(2).full_budget();
        let (a, _) = l.reserve(&caps(2), "a", full, now).unwrap();
        let (b, _) = l.reserve(&caps(2), "b", full, now).unwrap();
        assert!(matches!(
            l.reserve(&caps(2), "c", full, now),
            Err(CapsError::CapReached { .. })
        ));
        assert!(l.release(&b.id, now).unwrap());
        let spent = Spent {
            tokens: 42,
            cache_read_tokens: 9000,
            cost_micros: 1_250_000,
        };
        assert!(l.commit(&a.id, &spent, now).unwrap());
        let s = l.snapshot(&caps(2), now).unwrap();
        assert_eq!(s.windows[0].tasks, 1);
        assert_eq!(s.windows[0].tokens, 42);
        assert_eq!(s.windows[0].cache_read_tokens, 9000);
        assert_eq!(s.windows[0].cost_usd, 1.25);
        assert!(s.reservations.is_empty());
    }

    #[test]
    fn cost_caps_count_spent_and_reserved_dollars() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::new(&Paths::in_one_dir(dir.path().into()));
        let now = Local::now();
        let c = Caps {
            daily_tasks: 100,
            ..caps(100)
        };
        // $2.50 a day, $1 reserved per job: two fit, the third would pass it.
        let (a, _) = l.reserve(&c, "a", c.full_budget(), now).unwrap();
        let (_b, _) = l.reserve(&c, "b", c.full_budget(), now).unwrap();
        match l.reserve(&c, "c", c.full_budget(), now) {
            Err(e @ CapsError::CostCapReached { .. }) => {
                assert!(e.to_string().contains("daily cost cap"), "{e}");
                assert_eq!(e.exit(), Exit::Refused);
            }
            other => panic!("{other:?}"),
        }
        // A job that spent less frees the rest of its budget.
        l.commit(
            &a.id,
            &Spent {
                cost_micros: 100_000,
                ..Spent::default()
            },
            now,
        )
        .unwrap();
        l.reserve(&c, "d", c.full_budget(), now).unwrap();
    }

    #[test]
    fn dead_process_reservations_are_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::new(&Paths::in_one_dir(dir.path().into()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let state = State {
            days: BTreeMap::new(),
            reservations: vec![Reservation {
                id: "x".into(),
                job_id: "j".into(),
                pid,
                pid_start: Some(1),
                created: Local::now(),
                day: Local::now().date_naive(),
                tokens: 100,
                cost_micros: 0,
            }],
        };
        l.save(&state).unwrap();
        let c = Caps {
            concurrent_jobs: 1,
            ..caps(5)
        };
        let (_, reclaimed) = l.reserve(&c, "y", c.full_budget(), Local::now()).unwrap();
        assert_eq!(reclaimed.len(), 1);
    }
}
