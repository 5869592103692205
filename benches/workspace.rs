//! Timing a job's workspace round trip, without Docker.
//!
//! `cargo bench --bench workspace [-- --files N --mib M --runs R]`
//!
//! Generates a workspace of N files adding up to M MiB (default 5,000 files,
//! 50 MiB: mostly source-sized text, some larger binaries) with a `.git`
//! directory and a `.gitignore`, then times, best of R runs:
//!
//! 1. `select` (walk, ignore rules, SHA-256, copy to the spool);
//! 2. `write_tar` of the snapshot;
//! 3. `__workspace-unpack` through our binary into a tmpfs (`/dev/shm` when
//!    there is one, as the container's `/workspace` is);
//! 4. (untimed) a job's handful of edits, and a 10 MiB `target/` it builds;
//! 5. `__workspace-pack` through our binary;
//! 6. `diff` of that archive against the snapshot, patch included;
//! 7. `apply` of the change set to a copy of the original.
//!
//! The number that matters is host-side select + pack + diff (goal: well
//! under a second) and the whole trip (goal: within 2 s of a job without a
//! workspace, Docker's own `exec` overhead aside).

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use claude_max_market::workspace::{self, DiffRules, Rules};

const BIN: &str = env!("CARGO_BIN_EXE_claude-max-market");

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// A deterministic byte stream (xorshift), so every run sees the same tree.
struct Bytes(u64);

impl Bytes {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn text(&mut self, len: usize) -> Vec<u8> {
        const WORDS: [&str; 12] = [
            "let", "value", "fn", "return", "match", "self", "Some", "None", "=>", "{", "}", "config",
        ];
        let mut out = Vec::with_capacity(len + 64);
        while out.len() < len {
            for _ in 0..(self.next() % 10 + 2) {
                out.extend_from_slice(WORDS[(self.next() % 12) as usize].as_bytes());
                out.push(b' ');
            }
            out.push(b'\n');
        }
        out.truncate(len);
        out.push(b'\n');
        out
    }
    fn binary(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn put(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

/// `files` files adding up to `mib` MiB: 98% text, 2% binaries carrying
/// about 40% of the bytes.
fn generate(root: &Path, files: usize, mib: usize) {
    let mut b = Bytes(0x9e37_79b9_7f4a_7c15);
    let total = mib * 1024 * 1024;
    let binaries = (files / 50).max(1);
    let texts = files - binaries;
    let bin_size = total * 2 / 5 / binaries;
    let text_size = (total - bin_size * binaries) / texts.max(1);
    put(root, ".gitignore", b"target/\n*.tmp\n");
    put(root, ".git/HEAD", b"ref: refs/heads/main\n");
    for i in 0..texts.saturating_sub(1) {
        put(root, &format!("src/m{:02}/f{i:05}.rs", i % 50), &b.text(text_size));
    }
    for i in 0..binaries {
        put(root, &format!("assets/a{i:03}.bin"), &b.binary(bin_size));
    }
}

/// The job's edits: 3 files modified, 2 added, 1 deleted, 1 chmodded, 1
/// made binary, and a `target/` it built (ignored).
fn edit(c: &Path) {
    let mut b = Bytes(42);
    for f in ["src/m00/f00000.rs", "src/m01/f00001.rs", "src/m02/f00002.rs"] {
        let mut text = fs::read(c.join(f)).unwrap();
        let mid = text.len() / 2;
        text.splice(mid..mid, b"\n// changed by the job\nlet x = 1;\n".iter().copied());
        fs::write(c.join(f), text).unwrap();
    }
    put(c, "src/new/one.rs", &b.text(3000));
    put(c, "src/new/two.rs", &b.text(3000));
    fs::remove_file(c.join("src/m03/f00003.rs")).unwrap();
    fs::set_permissions(c.join("src/m04/f00004.rs"), fs::Permissions::from_mode(0o755)).unwrap();
    put(c, "src/m05/f00005.rs", &b.binary(4096));
    for i in 0..100 {
        put(c, &format!("target/release/deps/o{i}.o"), &b.binary(100 * 1024));
    }
}

fn mode(args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut sin = child.stdin.take().unwrap();
    let bytes = stdin.to_vec();
    let feeder = std::thread::spawn(move || sin.write_all(&bytes));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(out.status.success(), "{args:?} failed");
    out.stdout
}

fn tmpfs_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn ms(d: Duration) -> String {
    format!("{:7.1} ms", d.as_secs_f64() * 1000.0)
}

/// CPU time (user + system) of this process, or of its waited-for children.
fn cpu(children: bool) -> Duration {
    // SAFETY: getrusage fills the struct we pass and has no other effect.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(
            if children {
                libc::RUSAGE_CHILDREN
            } else {
                libc::RUSAGE_SELF
            },
            &mut u,
        );
        u
    };
    let t = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    t(u.ru_utime) + t(u.ru_stime)
}

/// Wall and CPU time of one step.
fn timed<T>(children: bool, f: impl FnOnce() -> T) -> (T, Duration, Duration) {
    let (c0, w0) = (cpu(children), Instant::now());
    let v = f();
    (v, w0.elapsed(), cpu(children) - c0)
}

fn main() {
    let files: usize = arg("--files", "5000").parse().expect("--files N");
    let mib: usize = arg("--mib", "50").parse().expect("--mib M");
    let runs: usize = arg("--runs", "5").parse().expect("--runs R");
    let orig = tempfile::tempdir().unwrap();
    generate(orig.path(), files, mib);
    let rules = Rules {
        global_excludes: None,
        ..Rules::default()
    };
    let names = [
        "select",
        "write_tar",
        "unpack (binary)",
        "pack (binary)",
        "diff",
        "apply",
    ];
    let mut best = [Duration::MAX; 6];
    let mut best_cpu = [Duration::MAX; 6];
    let mut last = String::new();
    for _ in 0..runs {
        let mut t = [Duration::ZERO; 6];
        let mut c = [Duration::ZERO; 6];
        let (snap, w, u) = timed(false, || workspace::select(orig.path(), &rules).unwrap());
        (t[0], c[0]) = (w, u);

        let (tar, w, u) = timed(false, || {
            let mut tar = Vec::with_capacity(snap.total_bytes() as usize + (1 << 20));
            snap.write_tar(&mut tar).unwrap();
            tar
        });
        (t[1], c[1]) = (w, u);

        let container = tempfile::tempdir_in(tmpfs_dir()).unwrap();
        let dir = container.path().to_str().unwrap();
        let ((), w, u) = timed(true, || {
            mode(&["__workspace-unpack", dir], &tar);
        });
        (t[2], c[2]) = (w, u);

        edit(container.path());
        let (out, w, u) = timed(true, || mode(&["__workspace-pack", dir], b""));
        (t[3], c[3]) = (w, u);

        let (changes, w, u) = timed(false, || {
            workspace::diff(&snap, &out[..], &DiffRules::new(out.len() as u64)).unwrap()
        });
        (t[4], c[4]) = (w, u);
        assert_eq!(changes.totals.files_changed, 8, "{}", changes.summary);

        let copy = tempfile::tempdir().unwrap();
        let cp = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", orig.path().display()))
            .arg(copy.path())
            .status()
            .unwrap();
        assert!(cp.success());
        // The copy has the same contents: the snapshot's check passes.
        let (_, w, u) = timed(false, || workspace::apply(&changes, &snap, copy.path()).unwrap());
        (t[5], c[5]) = (w, u);

        for i in 0..6 {
            best[i] = best[i].min(t[i]);
            best_cpu[i] = best_cpu[i].min(c[i]);
        }
        last = format!(
            "{}; tar in {} MiB, out {} MiB, patch {} bytes\n  {}",
            snap.summary(),
            tar.len() >> 20,
            out.len() >> 20,
            changes.patch.bytes,
            changes.summary
        );
    }
    println!("workspace: {last}");
    // SAFETY: getloadavg writes at most the 3 doubles we give it room for.
    let mut load = [0f64; 3];
    unsafe { libc::getloadavg(load.as_mut_ptr(), 3) };
    println!(
        "best of {runs} runs (load average {:.1} on {} CPUs):",
        load[0],
        num_cpus()
    );
    println!("  {:<16} {:>10} {:>10}", "step", "wall", "cpu");
    for ((name, d), c) in names.iter().zip(best).zip(best_cpu) {
        println!("  {name:<16} {} {}", ms(d), ms(c));
    }
    let sum = |v: &[Duration], idx: &[usize]| idx.iter().map(|&i| v[i]).sum::<Duration>();
    let host = [0, 1, 4];
    println!(
        "  host side (select + write_tar + diff): wall {}  cpu {}",
        ms(sum(&best, &host)),
        ms(sum(&best_cpu, &host))
    );
    let all = [0, 1, 2, 3, 4, 5];
    println!(
        "  whole trip (all six steps):            wall {}  cpu {}",
        ms(sum(&best, &all)),
        ms(sum(&best_cpu, &all))
    );
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}
