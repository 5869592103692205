//! The PostgreSQL part of the harness against a real server: a cluster
//! starts and accepts connections, fresh databases are distinct and
//! usable, a stopped cluster refuses connections and a restarted one on
//! the same port and data keeps what was committed, and no postmaster
//! outlives its cluster.
mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::time::Duration;

use common::wait_until;
use postgres::{connect, off_runtime, Cluster};

fn count(url: &str, sql: &str) -> i64 {
    off_runtime(|| {
        let mut c = connect(url).unwrap_or_else(|e| panic!("{e}"));
        c.query_one(sql, &[]).expect("query").get::<_, i64>(0)
    })
}

fn exec(url: &str, sql: &str) {
    off_runtime(|| {
        let mut c = connect(url).unwrap_or_else(|e| panic!("{e}"));
        c.batch_execute(sql).unwrap_or_else(|e| panic!("`{sql}`: {e}"));
    })
}

fn current_db(url: &str) -> String {
    off_runtime(|| {
        let mut c = connect(url).unwrap_or_else(|e| panic!("{e}"));
        c.query_one("SELECT current_database()", &[])
            .expect("current_database")
            .get::<_, String>(0)
    })
}

fn process_alive(pid: u32) -> bool {
    // /proc/PID/stat's third field is the state; a zombie is not running.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z'))
}

#[test]
fn fresh_databases_are_distinct_and_usable() {
    if !postgres::available("fresh_databases_are_distinct_and_usable") {
        return;
    }
    let pg = postgres::shared();
    assert_eq!(count(pg.url(), "SELECT 1::bigint"), 1);
    let (a, b) = (pg.fresh_db(), pg.fresh_db());
    assert_ne!(a, b, "two fresh databases have two URLs");
    let (name_a, name_b) = (current_db(&a), current_db(&b));
    assert_ne!(name_a, name_b, "the URLs name two databases");
    assert!(
        a.ends_with(&name_a) && b.ends_with(&name_b),
        "{a} / {name_a}, {b} / {name_b}"
    );
    exec(&a, "CREATE TABLE t (v bigint); INSERT INTO t VALUES (1), (2);");
    assert_eq!(count(&a, "SELECT COUNT(*) FROM t"), 2);
    assert_eq!(
        count(&b, "SELECT COUNT(*) FROM pg_tables WHERE tablename = 't'"),
        0,
        "a fresh database is empty: the table lives only in the first"
    );
    exec(&b, "CREATE TABLE t (v bigint); INSERT INTO t VALUES (7);");
    assert_eq!(count(&b, "SELECT SUM(v)::bigint FROM t"), 7);
    assert_eq!(count(&a, "SELECT SUM(v)::bigint FROM t"), 3);
}

#[test]
fn the_shared_cluster_is_one_per_process() {
    if !postgres::available("the_shared_cluster_is_one_per_process") {
        return;
    }
    let first = postgres::shared().url().to_string();
    let again = std::thread::spawn(|| postgres::shared().url().to_string())
        .join()
        .unwrap();
    assert_eq!(first, again, "every test of the process shares one cluster");
}

#[test]
fn a_stopped_cluster_refuses_connections_and_starts_again_with_its_data() {
    if !postgres::programs_available("a_stopped_cluster_refuses_connections_and_starts_again_with_its_data") {
        return;
    }
    let mut c = Cluster::start();
    let url = c.url();
    let port = c.port();
    let db = c.fresh_db();
    exec(&db, "CREATE TABLE kept (v bigint); INSERT INTO kept VALUES (42);");
    let pid = c.pid();
    assert!(process_alive(pid), "the postmaster runs");
    assert!(c.running());

    c.stop();
    assert!(!process_alive(pid), "stop waited for the postmaster to exit");
    let refused = postgres::ping(&url);
    assert!(refused.is_err(), "a stopped cluster accepts no connections");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on the stopped cluster's port"
    );

    c.start_again();
    assert_eq!(c.port(), port, "the same port");
    assert_eq!(c.url(), url);
    assert_ne!(c.pid(), pid, "a new postmaster");
    assert_eq!(
        count(&db, "SELECT SUM(v)::bigint FROM kept"),
        42,
        "the same data directory: what was committed before the stop is there"
    );

    let again = c.pid();
    let data = c.data_dir();
    assert!(data.join("PG_VERSION").is_file(), "{}", data.display());
    drop(c);
    assert!(!process_alive(again), "dropping the cluster stops its postmaster");
    assert!(
        wait_until(Duration::from_secs(5), || !data.exists()),
        "dropping the cluster removes its directory"
    );
    assert!(postgres::ping(&url).is_err(), "and it accepts no connections");
}

#[test]
fn urls_keep_their_server_and_options_with_another_database() {
    assert_eq!(postgres::with_db("postgres://u@h:5/a", "b"), "postgres://u@h:5/b");
    assert_eq!(
        postgres::with_db("postgres://u:p@h:5/a?sslmode=disable", "b"),
        "postgres://u:p@h:5/b?sslmode=disable"
    );
    assert_eq!(postgres::with_db("postgres://u@h:5", "b"), "postgres://u@h:5/b");
}

/// Run [`exit_helper`] in a child test process that ends as `mode` says;
/// the postmaster's pid and the cluster's directory it printed.
fn run_helper(mode: &str) -> (u32, std::path::PathBuf, std::process::Output) {
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "exit_helper", "--ignored", "--nocapture", "--test-threads=1"])
        .env("CMM_PG_EXIT_HELPER", mode)
        .env_remove("CMM_TEST_POSTGRES_URL")
        .output()
        .expect("run the test binary");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        // libtest prints the test's name on the same line.
        .find_map(|l| l.find("POSTMASTER ").map(|i| &l[i + "POSTMASTER ".len()..]))
        .unwrap_or_else(|| {
            panic!(
                "the helper printed no postmaster:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let (pid, dir) = line.split_once(' ').expect("pid and dir");
    (pid.parse().expect("pid"), dir.into(), out)
}

/// Not a test by itself: the child process of the exit tests.
#[test]
#[ignore = "run by the exit tests in a child process"]
fn exit_helper() {
    let Ok(mode) = std::env::var("CMM_PG_EXIT_HELPER") else {
        return;
    };
    if mode == "kill" {
        // A private cluster the test forgot to drop, in a process that
        // dies at once: only the death signal stops it.
        let c = Cluster::start();
        println!("POSTMASTER {} {}", c.pid(), c.data_dir().parent().unwrap().display());
        std::mem::forget(c);
        // SAFETY: the helper kills itself, as a crash would.
        unsafe { libc::kill(std::process::id() as i32, libc::SIGKILL) };
        unreachable!("killed");
    }
    let pg = postgres::shared();
    postgres::ping(pg.url()).expect("the shared cluster answers");
    let port: u16 = pg
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (pid, dir) = postmaster_on(port);
    println!("POSTMASTER {pid} {}", dir.display());
    if mode == "panic" {
        panic!("the helper fails on purpose");
    }
}

/// The pid and cluster directory of the postmaster listening on `port`
/// (its `postmaster.pid` names the port on its fourth line).
fn postmaster_on(port: u16) -> (u32, std::path::PathBuf) {
    for e in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
        let Ok(text) = std::fs::read_to_string(e.path().join("data/postmaster.pid")) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        if lines.get(3).is_some_and(|p| p.trim() == port.to_string()) {
            return (lines[0].trim().parse().unwrap(), e.path());
        }
    }
    panic!("no postmaster.pid names port {port}");
}

fn exits_leave_no_postmaster(mode: &str, test: &str) {
    if !postgres::programs_available(test) {
        return;
    }
    let (pid, dir, out) = run_helper(mode);
    assert!(
        wait_until(Duration::from_secs(20), || !process_alive(pid)),
        "the postmaster {pid} outlived a test process that ended by {mode}"
    );
    match mode {
        "kill" => {
            assert_eq!(out.status.code(), None, "killed by a signal");
            // The next run's cluster removes it; do it now.
            let _ = std::fs::remove_dir_all(&dir);
        }
        "panic" => assert_eq!(out.status.code(), Some(101), "the failing test fails the process"),
        _ => assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr)),
    }
    if mode != "kill" {
        assert!(
            wait_until(Duration::from_secs(5), || !dir.exists()),
            "the shared cluster's directory {} is removed when the process exits by {mode}",
            dir.display()
        );
    }
}

#[test]
fn no_postmaster_outlives_a_test_process_that_exits() {
    exits_leave_no_postmaster("exit", "no_postmaster_outlives_a_test_process_that_exits");
}

#[test]
fn no_postmaster_outlives_a_test_process_whose_test_panics() {
    exits_leave_no_postmaster("panic", "no_postmaster_outlives_a_test_process_whose_test_panics");
}

#[test]
fn no_postmaster_outlives_a_killed_test_process() {
    exits_leave_no_postmaster("kill", "no_postmaster_outlives_a_killed_test_process");
}
