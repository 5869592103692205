//! Caps and usage windows: reserve / commit / release under one lock.
//!
//! `usage.json` holds per-local-day totals (kept for 70 days, enough for any
//! window) and the open reservations. Every check-and-reserve happens under
//! `.usage.lock`, so N processes racing against a cap of K get exactly K
//! reservations (invariant 4). A reservation counts against every window as
//! one task plus `maxTokensPerTask` tokens until it is committed with the
//! real usage or released.
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

/// Totals for one local calendar day.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DayUsage {
    pub tasks: u64,
    pub tokens: u64,
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
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    #[serde(default)]
    days: BTreeMap<NaiveDate, DayUsage>,
    #[serde(default)]
    reservations: Vec<Reservation>,
}

/// The caps in force, resolved from config.
#[derive(Debug, Clone, Serialize)]
pub struct Caps {
    pub daily_tasks: u64,
    pub daily_tokens: u64,
    pub weekly_tasks: Option<u64>,
    pub weekly_tokens: Option<u64>,
    pub monthly_tasks: Option<u64>,
    pub monthly_tokens: Option<u64>,
    pub max_tokens_per_task: u64,
    pub concurrent_jobs: u64,
}

impl Caps {
    pub fn from_config(cfg: &Config) -> Caps {
        let u = |k| cfg.get_i64(k).max(0) as u64;
        let o = |k| cfg.get_opt_i64(k).map(|v| v.max(0) as u64);
        Caps {
            daily_tasks: u("limits.dailyTasks"),
            daily_tokens: u("limits.dailyTokens"),
            weekly_tasks: o("limits.weeklyTasks"),
            weekly_tokens: o("limits.weeklyTokens"),
            monthly_tasks: o("limits.monthlyTasks"),
            monthly_tokens: o("limits.monthlyTokens"),
            max_tokens_per_task: u("limits.maxTokensPerTask"),
            concurrent_jobs: u("limits.concurrentJobs"),
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
pub enum UsageError {
    #[error("{cap} reached: {used} of {limit} used{}", resets.map(|r| format!("; resets {}", r.format("%Y-%m-%d %H:%M %Z"))).unwrap_or_default())]
    CapReached {
        cap: String,
        used: u64,
        limit: u64,
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

impl HasExit for UsageError {
    fn exit(&self) -> Exit {
        match self {
            UsageError::CapReached { .. } => Exit::Refused,
            UsageError::Io { .. } => Exit::Failed,
            UsageError::Corrupt { .. } => Exit::Integrity,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            UsageError::CapReached { cap, .. } if cap.starts_with("concurrent") => Some(
                "wait for the running job to finish, or raise the cap with `claude-max-market limits --concurrent N`"
                    .into(),
            ),
            UsageError::CapReached { .. } => {
                Some("wait for the window to reset, or raise the cap with `claude-max-market limits`".into())
            }
            UsageError::Corrupt { path, .. } => Some(format!(
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
    pub tokens: u64,
    pub reserved_tasks: u64,
    pub reserved_tokens: u64,
    pub task_cap: Option<u64>,
    pub token_cap: Option<u64>,
    pub resets_at: DateTime<Local>,
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
    /// Count `tokens` of real usage against it.
    pub fn commit(&mut self, tokens: u64) -> Result<(), UsageError> {
        match self.id.take() {
            Some(id) => self.ledger.commit(&id, tokens, Local::now()).map(drop),
            None => Ok(()),
        }
    }
    pub fn release(&mut self) -> Result<(), UsageError> {
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

    fn io(&self, source: std::io::Error) -> UsageError {
        UsageError::Io {
            path: self.file.clone(),
            source,
        }
    }

    fn load(&self) -> Result<State, UsageError> {
        match std::fs::read(&self.file) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| UsageError::Corrupt {
                path: self.file.clone(),
                msg: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(self.io(e)),
        }
    }

    fn save(&self, state: &State) -> Result<(), UsageError> {
        let bytes = serde_json::to_vec(state).expect("state serialises");
        fsutil::atomic_write(&self.file, &bytes).map_err(|e| self.io(e))
    }

    /// Run `f` on the state under the lock, then save.
    fn locked<T>(
        &self,
        now: DateTime<Local>,
        f: impl FnOnce(&mut State) -> Result<T, UsageError>,
    ) -> Result<(T, Vec<Reservation>), UsageError> {
        fsutil::ensure_private_dir(&self.dir).map_err(|e| self.io(e))?;
        let _lock = FileLock::exclusive(&self.lock).map_err(|e| self.io(e))?;
        let mut state = self.load()?;
        let reclaimed = reclaim(&mut state);
        let cutoff = now.date_naive() - Duration::days(KEEP_DAYS);
        state.days.retain(|d, _| *d >= cutoff);
        let out = f(&mut state)?;
        self.save(&state)?;
        Ok((out, reclaimed))
    }

    /// Reserve one task against every cap, or say which cap is reached.
    /// Also returns reservations reclaimed from dead processes (to audit).
    pub fn reserve(
        &self,
        caps: &Caps,
        job_id: &str,
        now: DateTime<Local>,
    ) -> Result<(Reservation, Vec<Reservation>), UsageError> {
        self.locked(now, |state| {
            let today = now.date_naive();
            if state.reservations.len() as u64 >= caps.concurrent_jobs {
                return Err(UsageError::CapReached {
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
                        return Err(UsageError::CapReached {
                            cap: format!("{} task cap (limits.{}Tasks)", adjective(w), adjective(w)),
                            used: u.tasks + u.reserved_tasks,
                            limit: cap,
                            resets: Some(u.resets_at),
                        });
                    }
                }
                if let Some(cap) = u.token_cap {
                    if u.tokens + u.reserved_tokens + caps.max_tokens_per_task > cap {
                        return Err(UsageError::CapReached {
                            cap: format!(
                                "{} token cap (limits.{}Tokens; each job reserves limits.maxTokensPerTask = {})",
                                adjective(w),
                                adjective(w),
                                caps.max_tokens_per_task
                            ),
                            used: u.tokens + u.reserved_tokens,
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
                tokens: caps.max_tokens_per_task,
            };
            state.reservations.push(r.clone());
            Ok(r)
        })
    }

    /// Replace a reservation with real usage: one task and `tokens` tokens.
    pub fn commit(&self, reservation_id: &str, tokens: u64, now: DateTime<Local>) -> Result<bool, UsageError> {
        self.locked(now, |state| {
            let Some(i) = state.reservations.iter().position(|r| r.id == reservation_id) else {
                return Ok(false);
            };
            let r = state.reservations.remove(i);
            let d = state.days.entry(r.day).or_default();
            d.tasks += 1;
            d.tokens += tokens;
            Ok(true)
        })
        .map(|(found, _)| found)
    }

    /// Drop a reservation without counting it (the job never started).
    pub fn release(&self, reservation_id: &str, now: DateTime<Local>) -> Result<bool, UsageError> {
        self.locked(now, |state| {
            let before = state.reservations.len();
            state.reservations.retain(|r| r.id != reservation_id);
            Ok(before != state.reservations.len())
        })
        .map(|(found, _)| found)
    }

    /// Read-only view (no lock needed: the file is replaced atomically).
    pub fn snapshot(&self, caps: &Caps, now: DateTime<Local>) -> Result<Snapshot, UsageError> {
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
    let (mut tasks, mut tokens) = (0, 0);
    for (day, u) in &state.days {
        if w.contains(today, *day) {
            tasks += u.tasks;
            tokens += u.tokens;
        }
    }
    let (mut rt, mut rtok) = (0, 0);
    for r in &state.reservations {
        if w.contains(today, r.day) {
            rt += 1;
            rtok += r.tokens;
        }
    }
    WindowUsage {
        window: w,
        tasks,
        tokens,
        reserved_tasks: rt,
        reserved_tokens: rtok,
        task_cap: w.task_cap(caps),
        token_cap: w.token_cap(caps),
        resets_at: w.resets_at(today),
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
        let (a, _) = l.reserve(&caps(2), "a", now).unwrap();
        let (b, _) = l.reserve(&caps(2), "b", now).unwrap();
        assert!(matches!(
            l.reserve(&caps(2), "c", now),
            Err(UsageError::CapReached { .. })
        ));
        assert!(l.release(&b.id, now).unwrap());
        assert!(l.commit(&a.id, 42, now).unwrap());
        let s = l.snapshot(&caps(2), now).unwrap();
        assert_eq!(s.windows[0].tasks, 1);
        assert_eq!(s.windows[0].tokens, 42);
        assert!(s.reservations.is_empty());
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
            }],
        };
        l.save(&state).unwrap();
        let c = Caps {
            concurrent_jobs: 1,
            ..caps(5)
        };
        let (_, reclaimed) = l.reserve(&c, "y", Local::now()).unwrap();
        assert_eq!(reclaimed.len(), 1);
    }
}
