//! The PostgreSQL part of the harness: a throwaway PostgreSQL cluster
//! (`initdb` into a fresh temp dir, `postgres` on a free loopback port,
//! trust authentication, superuser `postgres`) and fresh databases in it,
//! for the coordinator's PostgreSQL store.
//!
//! - The server programs come from `CMM_PG_BIN` (a directory), else
//!   `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`,
//!   else `PATH`.
//! - [`shared`] is one cluster per test process (or the one at
//!   `CMM_TEST_POSTGRES_URL`, whose user may create databases);
//!   [`Cluster::start`] is a private one, for a test that stops it.
//! - [`available`] is the skip rule: without PostgreSQL a test prints a
//!   loud `SKIPPED (no PostgreSQL)` line and returns, unless
//!   `CMM_REQUIRE_POSTGRES=1` makes that a failure.
//! - As root (CI), `initdb` and `postgres` run as the `postgres` user,
//!   since PostgreSQL refuses to run as root.
//! - No postmaster outlives the test process: every one is started from
//!   one long-lived thread with a parent-death signal (its backends exit
//!   when it does), the shared cluster is stopped and removed at exit, and
//!   the directory of a cluster whose process was killed is removed by the
//!   next run.
//!
//! It uses nothing else of the harness, so that the load bench includes it
//! too (`#[path = "../tests/common/postgres.rs"] mod postgres;`); tests
//! include it with `#[path = "common/postgres.rs"] mod postgres;`, and the
//! market part of the harness as `market::postgres`. It never runs our
//! binary.
#![allow(dead_code)]

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Settings for test clusters: nothing is flushed to disk (a test cluster
/// never survives a machine crash), and room for many coordinators.
pub const TEST_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "300"),
];

/// Settings for measurements: PostgreSQL's durable defaults.
pub const DURABLE_SETTINGS: &[(&str, &str)] = &[("max_connections", "300")];

/// The superuser `initdb` creates and every URL names.
pub const SUPERUSER: &str = "postgres";

const DIR_PREFIX: &str = "cmm-pg-";
const READY_WITHIN: Duration = Duration::from_secs(60);
const STOP_WITHIN: Duration = Duration::from_secs(60);

/// The directory holding `initdb` and `postgres`, or why none was found.
pub fn bin_dir() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND.get_or_init(find_bin_dir).clone()
}

fn has_server(dir: &Path) -> bool {
    dir.join("postgres").is_file() && dir.join("initdb").is_file()
}

fn find_bin_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("CMM_PG_BIN") {
        let d = PathBuf::from(d);
        return if has_server(&d) {
            Ok(d)
        } else {
            Err(format!(
                "CMM_PG_BIN={} holds no `postgres` and `initdb`: point it at PostgreSQL's bin directory",
                d.display()
            ))
        };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").stderr(Stdio::null()).output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&d) {
            return Ok(d);
        }
    }
    // Debian keeps each major version's programs in its own directory.
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let v: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((v?, e.path().join("bin")))
        })
        .filter(|(_, d)| has_server(d))
        .collect();
    versions.sort();
    if let Some((_, d)) = versions.pop() {
        return Ok(d);
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(d) = std::env::split_paths(&path).find(|d| has_server(d)) {
            return Ok(d);
        }
    }
    Err(
        "no PostgreSQL server programs (`initdb`, `postgres`) in CMM_PG_BIN, `pg_config --bindir`, \
         /usr/lib/postgresql/*/bin or PATH: install PostgreSQL (`apt-get install postgresql`), \
         set CMM_PG_BIN to its bin directory, or set CMM_TEST_POSTGRES_URL to a running server"
            .to_string(),
    )
}

/// Can the PostgreSQL tests run here? Without a server (neither
/// `CMM_TEST_POSTGRES_URL` nor the programs) a test skips loudly, unless
/// `CMM_REQUIRE_POSTGRES=1` makes that a failure.
pub fn available(test: &str) -> bool {
    std::env::var_os("CMM_TEST_POSTGRES_URL").is_some() || programs_available(test)
}

/// Can a test start a cluster of its own ([`Cluster::start`], to stop and
/// start it)? The same skip rule as [`available`], without the URL.
pub fn programs_available(test: &str) -> bool {
    match bin_dir() {
        Ok(_) => true,
        Err(why) => {
            if std::env::var("CMM_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!("{test}: {why} (and CMM_REQUIRE_POSTGRES=1)");
            }
            eprintln!(
                "\n*** SKIPPED (no PostgreSQL): {test}: {why} (set CMM_REQUIRE_POSTGRES=1 to fail instead) ***\n"
            );
            false
        }
    }
}

/// An error with its causes (the driver's own text leaves them out).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// A throwaway PostgreSQL cluster: its own data directory, one postmaster
/// on 127.0.0.1. Dropping it stops it at once and removes the directory.
pub struct Cluster {
    bin: PathBuf,
    /// Holds `data/`, the socket and `postgres.log`.
    dir: tempfile::TempDir,
    port: u16,
    settings: Vec<(String, String)>,
    postmaster: Option<Child>,
}

impl Cluster {
    /// A cluster with [`TEST_SETTINGS`], accepting connections; panics
    /// with the reason (and the server's log) if it cannot start.
    pub fn start() -> Cluster {
        Cluster::start_with(TEST_SETTINGS).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A cluster with these `postgres -c` settings, accepting connections.
    pub fn start_with(settings: &[(&str, &str)]) -> Result<Cluster, String> {
        let bin = bin_dir()?;
        remove_abandoned_dirs();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir for PostgreSQL: {e}"))?;
        std::fs::write(dir.path().join("owner.pid"), std::process::id().to_string())
            .map_err(|e| format!("cannot write into {}: {e}", dir.path().display()))?;
        if let Some((uid, gid)) = server_user()? {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| format!("cannot hand {} to the `{SUPERUSER}` user: {e}", dir.path().display()))?;
        }
        let mut c = Cluster {
            bin,
            dir,
            port: 0,
            settings: settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            postmaster: None,
        };
        c.initdb()?;
        // A free port can be taken by someone else before the postmaster
        // binds it: then try another one.
        let mut last = String::new();
        for _ in 0..5 {
            c.port = free_port()?;
            match c.run_postmaster() {
                Ok(()) => return Ok(c),
                Err(e) if e.contains("already in use") => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    fn initdb(&self) -> Result<(), String> {
        let data = self.data_dir();
        let mut cmd = self.server_cmd("initdb")?;
        cmd.arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .stdin(Stdio::null());
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.join("initdb").display()))?;
        if !out.status.success() {
            return Err(format!(
                "initdb into {} failed ({}):\n{}{}",
                data.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// `initdb` or `postgres` from the cluster's programs, as the `postgres`
    /// user when we are root.
    fn server_cmd(&self, prog: &str) -> Result<Command, String> {
        let mut cmd = Command::new(self.bin.join(prog));
        cmd.current_dir(self.dir.path()).env("LC_ALL", "C");
        if let Some((uid, gid)) = server_user()? {
            cmd.uid(uid).gid(gid);
        }
        Ok(cmd)
    }

    /// Start the postmaster on `self.port` and wait until it accepts
    /// connections.
    fn run_postmaster(&mut self) -> Result<(), String> {
        let log_path = self.log_path();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.server_cmd("postgres")?;
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg("listen_addresses=127.0.0.1")
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.path().display()));
        for (k, v) in &self.settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let mut child =
            spawn_tied(cmd).map_err(|e| format!("cannot start {}: {e}", self.bin.join("postgres").display()))?;
        let url = self.url();
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "postgres on port {} exited ({status}) before accepting connections:\n{}",
                    self.port,
                    self.log_since(log_start)
                ));
            }
            if ping(&url).is_ok() {
                self.postmaster = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                kill_and_reap(&mut child, libc::SIGKILL, Duration::from_secs(10));
                return Err(format!(
                    "postgres on port {} did not accept connections within {}s:\n{}",
                    self.port,
                    READY_WITHIN.as_secs(),
                    self.log_since(log_start)
                ));
            }
            // Polling for readiness: PostgreSQL sends no signal when ready.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        db_url(self.port, "postgres")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.log_since(0)
    }

    fn log_since(&self, from: u64) -> String {
        let text = std::fs::read(self.log_path()).unwrap_or_default();
        let from = (from as usize).min(text.len());
        String::from_utf8_lossy(&text[from..]).into_owned()
    }

    /// The postmaster's process id (0 when stopped).
    pub fn pid(&self) -> u32 {
        self.postmaster.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn running(&mut self) -> bool {
        self.postmaster
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// A new, uniquely named, empty database; its URL.
    pub fn fresh_db(&self) -> String {
        create_db(&self.url()).unwrap_or_else(|e| panic!("{e}\n{}", self.log()))
    }

    /// Fast shutdown (sessions are ended, a checkpoint is written); waits
    /// until the postmaster has exited. Panics if it is not running or
    /// does not stop.
    pub fn stop(&mut self) {
        let mut child = self.postmaster.take().expect("stop: the cluster is not running");
        if !kill_and_reap(&mut child, libc::SIGINT, STOP_WITHIN) {
            panic!(
                "postgres (pid {}) did not stop within {}s of a fast shutdown:\n{}",
                child.id(),
                STOP_WITHIN.as_secs(),
                self.log()
            );
        }
    }

    /// Start again on the same port and data directory after [`stop`];
    /// waits until it accepts connections. If something else took the
    /// port meanwhile, it tries again for a while.
    ///
    /// [`stop`]: Cluster::stop
    pub fn start_again(&mut self) {
        assert!(self.postmaster.is_none(), "start_again: the cluster is running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.run_postmaster() {
                Ok(()) => return,
                Err(e) if e.contains("already in use") && Instant::now() < deadline => {
                    // Polling for the port to be released.
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}

impl Drop for Cluster {
    /// Immediate shutdown, then the directory goes with the `TempDir`.
    fn drop(&mut self) {
        if let Some(mut child) = self.postmaster.take() {
            if !kill_and_reap(&mut child, libc::SIGQUIT, Duration::from_secs(20)) {
                kill_and_reap(&mut child, libc::SIGKILL, Duration::from_secs(10));
            }
        }
    }
}

/// The cluster every test of this process shares.
pub struct Shared {
    url: String,
    /// `None` for a cluster given by `CMM_TEST_POSTGRES_URL`; taken at exit.
    own: Mutex<Option<Cluster>>,
}

impl Shared {
    /// The URL of the administrative database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A new, uniquely named, empty database; its URL.
    pub fn fresh_db(&self) -> String {
        create_db(&self.url).unwrap_or_else(|e| panic!("{e}"))
    }

    /// True when the cluster was started here (not `CMM_TEST_POSTGRES_URL`).
    pub fn is_own(&self) -> bool {
        self.own.lock().map(|g| g.is_some()).unwrap_or(false)
    }
}

static SHARED: OnceLock<Shared> = OnceLock::new();

/// The one cluster of this test process, started on first use with
/// [`TEST_SETTINGS`] (or `CMM_TEST_POSTGRES_URL` if set, left running).
/// Panics if it cannot start; call [`available`] first.
pub fn shared() -> &'static Shared {
    SHARED.get_or_init(|| {
        if let Ok(url) = std::env::var("CMM_TEST_POSTGRES_URL") {
            if let Err(e) = ping(&url) {
                panic!("CMM_TEST_POSTGRES_URL={url} does not answer: {e}");
            }
            return Shared {
                url,
                own: Mutex::new(None),
            };
        }
        let c = Cluster::start();
        let url = c.url();
        // SAFETY: registers a plain function; it runs at process exit.
        unsafe { libc::atexit(stop_shared_at_exit) };
        Shared {
            url,
            own: Mutex::new(Some(c)),
        }
    })
}

/// Stops the shared cluster and removes its directory when the test
/// process exits (statics are never dropped).
extern "C" fn stop_shared_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        if let Some(s) = SHARED.get() {
            if let Ok(mut own) = s.own.try_lock() {
                drop(own.take());
            }
        }
    });
}

/// `postgres://postgres@127.0.0.1:PORT/DB`.
fn db_url(port: u16, db: &str) -> String {
    format!("postgres://{SUPERUSER}@127.0.0.1:{port}/{db}")
}

/// `url` with its database name replaced by `db` (query kept).
pub fn with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.find('?') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    };
    let authority_at = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[authority_at..]
        .find('/')
        .map(|i| authority_at + i)
        .unwrap_or(base.len());
    format!("{}/{db}{query}", &base[..host_end])
}

/// Create a uniquely named database on the server at `admin_url`.
pub fn create_db(admin_url: &str) -> Result<String, String> {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000_000)
        .unwrap_or(0);
    let name = format!("cmm_{}_{n}_{stamp}", std::process::id());
    let sql = format!("CREATE DATABASE {name}");
    off_runtime(|| {
        let mut c = connect(admin_url)?;
        c.batch_execute(&sql)
            .map_err(|e| format!("`{sql}` on {admin_url} failed: {}", chain(&e)))
    })?;
    Ok(with_db(admin_url, &name))
}

/// A blocking client to `url` (give up connecting after 5 s). The
/// blocking client runs its own runtime: call it from a plain thread
/// (see [`off_runtime`]).
pub fn connect(url: &str) -> Result<postgres::Client, String> {
    let mut cfg: postgres::Config = url.parse().map_err(|e| format!("{url} is not a PostgreSQL URL: {e}"))?;
    cfg.connect_timeout(Duration::from_secs(5));
    cfg.connect(postgres::NoTls)
        .map_err(|e| format!("cannot connect to {url}: {}", chain(&e)))
}

/// `SELECT 1` on `url`.
pub fn ping(url: &str) -> Result<(), String> {
    off_runtime(|| {
        connect(url)?
            .simple_query("SELECT 1")
            .map(drop)
            .map_err(|e| format!("{url} refused `SELECT 1`: {}", chain(&e)))
    })
}

/// Run `f` on its own thread: the blocking `postgres` client starts a
/// runtime of its own, which panics inside a caller's Tokio runtime.
pub fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// As root, the uid and gid of the `postgres` user to run the server
/// programs as; `None` for anyone else.
fn server_user() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    // SAFETY: getpwnam reads a NUL-terminated name; the fields are copied
    // out at once (nothing else in the harness calls getpw*).
    let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
    if pw.is_null() {
        return Err(
            "running as root, and PostgreSQL refuses to run as root, but there is no \
                    `postgres` user to run it as: create one (`useradd --system postgres`) or run \
                    the tests as another user"
                .to_string(),
        );
    }
    // SAFETY: pw is non-null and points to getpwnam's static record.
    Ok(Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) }))
}

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawn `cmd` from the long-lived spawner thread with a parent-death
/// signal: Linux sends it when the thread that forked the child ends, so
/// the child is tied to that thread, which lasts as long as the process
/// (a test's own thread would end with the test).
fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions. It runs after the uid and gid are
    // set, which matters: changing credentials clears the death signal.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The test process died between fork and prctl.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the test process is gone"));
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("postgres-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the PostgreSQL spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, tx))
        .map_err(|_| std::io::Error::other("the PostgreSQL spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the PostgreSQL spawner thread is gone"))?
}

/// Send `sig` and wait up to `within` for the exit; true if it exited.
fn kill_and_reap(child: &mut Child, sig: libc::c_int, within: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() > deadline => return false,
            // Polling for the exit: a child's exit has no waitable timeout.
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Remove the directories of clusters whose test process is gone (killed
/// before it could clean up), once their postmaster is gone too.
fn remove_abandoned_dirs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let alive = |pid: &str| {
            pid.trim()
                .parse::<u32>()
                .is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists())
        };
        for e in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
            if !e.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
                continue;
            }
            let Ok(owner) = std::fs::read_to_string(e.path().join("owner.pid")) else {
                continue;
            };
            let postmaster = std::fs::read_to_string(e.path().join("data/postmaster.pid")).unwrap_or_default();
            if !alive(&owner) && !alive(postmaster.lines().next().unwrap_or_default()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
}
