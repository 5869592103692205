//! The two in-container modes of our binary (`__workspace-unpack DIR`,
//! `__workspace-pack DIR`), run as the container runs them: our binary, as
//! uid 10001 when the tests run as root, talking tar over stdin/stdout. And
//! the whole round trip a job's workspace makes: select on the host, unpack
//! and pack through the binary, diff on the host, `git apply` and `apply`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use claude_max_market::exit::{Exit, HasExit};
use claude_max_market::workspace::{self, ChangeKind, DiffRules, Rules, WorkspaceError};

const JOB_UID: u32 = 10001;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn tmp() -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("cmm-wsm-").tempdir().expect("temp dir");
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

fn put(root: &Path, rel: &str, content: impl AsRef<[u8]>) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir -p");
    fs::write(p, content).expect("write");
}

fn chmod(root: &Path, rel: &str, mode: u32) {
    fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Hand a tree to the job's uid, as the container's tmpfs is.
fn give_to_job(root: &Path) {
    if !is_root() {
        return;
    }
    fn walk(p: &Path) {
        std::os::unix::fs::lchown(p, Some(JOB_UID), Some(JOB_UID)).expect("lchown");
        if fs::symlink_metadata(p).expect("lstat").is_dir() {
            for e in fs::read_dir(p).expect("read_dir") {
                walk(&e.expect("entry").path());
            }
        }
    }
    walk(root);
}

struct Out {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

/// Run a workspace mode of our binary as the job's user.
fn mode(args: &[&str], stdin: &[u8]) -> Out {
    let mut run = common::bare(args).stdin(stdin);
    if is_root() {
        run = run.uid(JOB_UID, JOB_UID);
    }
    let out = run.run_bytes();
    Out {
        code: out.status,
        stdout: out.stdout,
        stderr: out.stderr,
    }
}

#[track_caller]
fn pack(dir: &Path) -> Vec<u8> {
    let out = mode(&["__workspace-pack", dir.to_str().expect("utf-8 path")], b"");
    assert_eq!(out.code, 0, "pack failed: {}", out.stderr);
    assert!(out.stderr.is_empty(), "pack said: {}", out.stderr);
    out.stdout
}

#[track_caller]
fn unpack(dir: &Path, tar: &[u8]) {
    let out = mode(&["__workspace-unpack", dir.to_str().expect("utf-8 path")], tar);
    assert_eq!(out.code, 0, "unpack failed: {}", out.stderr);
    assert!(out.stderr.is_empty() && out.stdout.is_empty());
}

/// path -> (kind, content or target, permission bits, mtime for files).
type Tree = BTreeMap<String, (char, Vec<u8>, u32, i64)>;

fn tree(root: &Path) -> Tree {
    fn walk(root: &Path, rel: &str, out: &mut Tree) {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        for e in fs::read_dir(dir).expect("read_dir") {
            let e = e.expect("entry");
            let name = e.file_name().to_string_lossy().to_string();
            let child = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let m = fs::symlink_metadata(e.path()).expect("lstat");
            let bits = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                let t = fs::read_link(e.path()).expect("readlink");
                out.insert(child, ('l', t.to_string_lossy().as_bytes().to_vec(), 0, 0));
            } else if m.is_dir() {
                out.insert(child.clone(), ('d', Vec::new(), bits, 0));
                walk(root, &child, out);
            } else if m.is_file() {
                out.insert(child, ('f', fs::read(e.path()).expect("read"), bits, m.mtime()));
            } else {
                out.insert(child, ('s', Vec::new(), bits, 0));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

/// Files and links: (kind, content, owner's execute bit); what a patch carries.
fn content(t: &Tree) -> BTreeMap<String, (char, Vec<u8>, bool)> {
    t.iter()
        .filter(|(_, v)| v.0 == 'f' || v.0 == 'l')
        .map(|(k, v)| (k.clone(), (v.0, v.1.clone(), v.0 == 'f' && v.2 & 0o100 != 0)))
        .collect()
}

fn entry_names(tar: &[u8]) -> Vec<String> {
    let mut ar = tar::Archive::new(tar);
    ar.entries()
        .expect("entries")
        .map(|e| e.expect("entry").path().expect("path").to_string_lossy().into_owned())
        .collect()
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// A tree with one of everything a workspace can hold.
fn assorted(root: &Path) {
    put(root, "src/main.rs", "fn main() {}\n");
    put(root, "run.sh", "#!/bin/sh\n");
    chmod(root, "run.sh", 0o755);
    put(root, "private.key", "k");
    chmod(root, "private.key", 0o600);
    put(root, "empty", "");
    put(root, "bin.dat", [0u8, 255, 0, 1, 2]);
    put(root, &format!("{}/{}.txt", "d".repeat(90), "f".repeat(90)), "long path");
    put(root, "caf\u{e9} & spaces.txt", "unicode");
    put(root, "ro/inside.txt", "in a read-only dir");
    chmod(root, "ro", 0o555);
    put(root, "readonly.txt", "r");
    chmod(root, "readonly.txt", 0o444);
    fs::create_dir_all(root.join("empty-dir/nested")).expect("mkdir");
    symlink("src/main.rs", root.join("link-to-file")).expect("symlink");
    symlink("src", root.join("link-to-dir")).expect("symlink");
    symlink("does/not/exist", root.join("dangling")).expect("symlink");
    symlink("../../../x", root.join("src/far-up")).expect("symlink");
}

// ---------------------------------------------------------------------------

#[test]
fn pack_then_unpack_keeps_contents_modes_times_and_links() {
    let src = tmp();
    assorted(src.path());
    give_to_job(src.path());
    let tar = pack(src.path());
    let dst = tmp();
    give_to_job(dst.path());
    unpack(dst.path(), &tar);
    assert_eq!(tree(dst.path()), tree(src.path()));
    if is_root() {
        let owner = fs::metadata(dst.path().join("src/main.rs")).unwrap().uid();
        assert_eq!(owner, JOB_UID, "extracted as the job's user");
    }
    // Packing the same tree again gives the same bytes.
    assert_eq!(pack(src.path()), tar);
}

#[test]
fn pack_reads_files_the_job_made_unreadable_and_keeps_their_mode() {
    let src = tmp();
    put(src.path(), "locked", "still here");
    put(src.path(), "shut/inner", "inside");
    chmod(src.path(), "locked", 0o000);
    chmod(src.path(), "shut", 0o000);
    give_to_job(src.path());
    let tar = pack(src.path());
    let dst = tmp();
    give_to_job(dst.path());
    unpack(dst.path(), &tar);
    let bits = |p: &str| fs::symlink_metadata(dst.path().join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(bits("locked"), 0o000);
    assert_eq!(bits("shut"), 0o000);
    chmod(dst.path(), "shut", 0o700);
    chmod(dst.path(), "locked", 0o600);
    assert_eq!(fs::read(dst.path().join("locked")).unwrap(), b"still here");
    assert_eq!(fs::read(dst.path().join("shut/inner")).unwrap(), b"inside");
}

#[test]
fn pack_skips_special_files_and_never_follows_links() {
    let outside = tmp();
    put(outside.path(), "secret", "host secret");
    let src = tmp();
    put(src.path(), "a.txt", "a");
    mkfifo(&src.path().join("pipe"));
    let _sock = std::os::unix::net::UnixListener::bind(src.path().join("sock")).unwrap();
    symlink(outside.path(), src.path().join("out")).unwrap();
    give_to_job(src.path());
    let tar = pack(src.path());
    assert_eq!(entry_names(&tar), ["a.txt", "out"]);
    assert!(
        !tar.windows(11).any(|w| w == b"host secret"),
        "the link's target was not read"
    );
}

#[test]
fn the_snapshot_tar_unpacks_in_the_container_mode() {
    let src = tmp();
    assorted(src.path());
    fs::remove_file(src.path().join("src/far-up")).unwrap(); // selection refuses links that leave
    put(src.path(), ".gitignore", "target/\n");
    put(src.path(), "target/big", vec![1u8; 4096]);
    let snap = workspace::select(
        src.path(),
        &Rules {
            global_excludes: None,
            ..Rules::default()
        },
    )
    .unwrap();
    let mut tar = Vec::new();
    snap.write_tar(&mut tar).unwrap();
    let dst = tmp();
    give_to_job(dst.path());
    unpack(dst.path(), &tar);
    let mut want = tree(src.path());
    want.retain(|p, _| !p.starts_with("target"));
    assert_eq!(tree(dst.path()), want);
}

use common::raw_tar::raw_tar;

#[test]
fn hostile_archives_are_refused_and_nothing_lands_outside() {
    use tar::EntryType::{Block, Char, Link, Regular, Symlink};
    let outside = tmp();
    let o = outside.path().to_str().unwrap().as_bytes().to_vec();
    let o_file = [o.as_slice(), b"/planted"].concat();
    let up = b"../".repeat(12);
    let abs = [o.as_slice(), b"/abs"].concat();
    let dotdot = [up.as_slice(), &o[1..], b"/dotdot"].concat();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("absolute path", raw_tar(&[(&abs, Regular, b"x", b"")]), "absolute path"),
        ("dot-dot", raw_tar(&[(&dotdot, Regular, b"x", b"")]), "`..`"),
        (
            "write through a link made earlier",
            raw_tar(&[(b"l", Symlink, b"", &o), (b"l/planted", Regular, b"x", b"")]),
            "through a symbolic link",
        ),
        (
            "file over a link made earlier",
            raw_tar(&[(b"l", Symlink, b"", &o_file), (b"l", Regular, b"x", b"")]),
            "twice",
        ),
        (
            "directory through a link",
            raw_tar(&[
                (b"d", Symlink, b"", &o),
                (b"d/sub/", tar::EntryType::Directory, b"", b""),
            ]),
            "through a symbolic link",
        ),
        ("hard link", raw_tar(&[(b"h", Link, b"", &o_file)]), "Link"),
        ("device", raw_tar(&[(b"dev", Char, b"", b"")]), "Char"),
        ("block device", raw_tar(&[(b"blk", Block, b"", b"")]), "Block"),
    ];
    for (what, tar, says) in cases {
        let dst = tmp();
        give_to_job(dst.path());
        give_to_job(outside.path());
        let out = mode(&["__workspace-unpack", dst.path().to_str().unwrap()], &tar);
        assert_eq!(out.code, 1, "{what}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{what}: one line: {}", out.stderr);
        assert!(
            out.stderr.starts_with("claude-max-market workspace: ") && out.stderr.contains(says),
            "{what}: {}",
            out.stderr
        );
        assert!(
            tree(outside.path()).is_empty(),
            "{what}: wrote outside: {:?}",
            tree(outside.path())
        );
    }
}

#[test]
fn a_truncated_archive_fails_cleanly() {
    let src = tmp();
    put(src.path(), "big", vec![b'x'; 10_000]);
    give_to_job(src.path());
    let tar = pack(src.path());
    let dst = tmp();
    give_to_job(dst.path());
    let out = mode(&["__workspace-unpack", dst.path().to_str().unwrap()], &tar[..3000]);
    assert_eq!(out.code, 1);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}

#[test]
fn the_modes_say_how_to_call_them() {
    for m in ["__workspace-pack", "__workspace-unpack"] {
        let out = mode(&[m], b"");
        assert_eq!(out.code, 1);
        assert!(out.stderr.contains(&format!("usage: {m} DIR")), "{}", out.stderr);
        let out = mode(&[m, "/nonexistent/workspace"], b"");
        assert_eq!(out.code, 1);
        assert!(out.stderr.contains("/nonexistent/workspace"), "{}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1);
    }
}

// ---------------------------------------------------------------------------
// The whole trip

fn git(dir: &Path, args: &[&str], stdin: &[u8]) -> (bool, String) {
    let empty = tmp();
    let mut child = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", empty.path())
        .env("XDG_CONFIG_HOME", empty.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("git");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn copy_tree(from: &Path) -> tempfile::TempDir {
    let to = tmp();
    assert!(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to.path())
        .status()
        .unwrap()
        .success());
    to
}

fn project(root: &Path) {
    put(root, ".gitignore", "target/\n.env\n");
    put(root, ".env", "TOKEN=mine\n");
    put(root, "README.md", "# Project\n\nIntro.\n");
    put(
        root,
        "src/lib.rs",
        (1..=30).map(|i| format!("fn f{i}() {{}}\n")).collect::<String>(),
    );
    put(root, "src/old.rs", "// to be removed\n");
    put(root, "tools/build.sh", "#!/bin/sh\nmake\n");
    put(root, "assets/logo.txt", "not yet binary\n");
    symlink("README.md", root.join("docs")).unwrap();
}

/// What the job does inside the container.
fn edit(c: &Path) {
    put(c, "src/new.rs", "pub fn new() {}\n");
    let lib: String = (1..=30)
        .map(|i| {
            if i == 7 {
                "fn seven() {}\n".to_string()
            } else {
                format!("fn f{i}() {{}}\n")
            }
        })
        .collect();
    put(c, "src/lib.rs", lib + "fn tail() {}");
    fs::remove_file(c.join("src/old.rs")).unwrap();
    chmod(c, "tools/build.sh", 0o755);
    put(c, "assets/logo.txt", [0x89, b'P', b'N', b'G', 0, 0, 0, 13]);
    fs::remove_file(c.join("docs")).unwrap();
    symlink("src/lib.rs", c.join("docs")).unwrap();
    put(c, "target/release/app", vec![0u8; 2048]);
    put(c, ".env", "TOKEN=the job's\n");
}

#[test]
fn a_workspace_round_trip_diffs_to_a_patch_git_applies_and_apply_reproduces() {
    let orig = tmp();
    project(orig.path());
    let rules = Rules {
        global_excludes: None,
        ..Rules::default()
    };
    let snap = workspace::select(orig.path(), &rules).unwrap();
    let mut tar = Vec::new();
    snap.write_tar(&mut tar).unwrap();

    let container = tmp();
    give_to_job(container.path());
    unpack(container.path(), &tar);
    edit(container.path());
    give_to_job(container.path());
    let out_tar = pack(container.path());

    let changes = workspace::diff(&snap, &out_tar[..], &DiffRules::new(out_tar.len() as u64)).unwrap();
    let kinds: BTreeMap<&str, ChangeKind> = changes.files.iter().map(|f| (f.path.as_str(), f.change)).collect();
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("assets/logo.txt", ChangeKind::Modified),
            ("docs", ChangeKind::Modified),
            ("src/lib.rs", ChangeKind::Modified),
            ("src/new.rs", ChangeKind::Added),
            ("src/old.rs", ChangeKind::Deleted),
            ("tools/build.sh", ChangeKind::ModeChanged),
        ])
    );
    assert_eq!(changes.ignored.paths, [".env", "target"]);
    let t = &changes.totals;
    assert_eq!(
        changes.summary,
        format!(
            "6 files changed: 1 added, 3 modified, 1 deleted, 1 mode changed (+{} -{}); 1 binary; 2 ignored paths left out",
            t.lines_added, t.lines_removed
        )
    );

    // git accepts the patch against a copy of the original, and applying
    // it gives the job's tree, less what the rules leave out.
    let copy = copy_tree(orig.path());
    let patch = changes.patch_text().unwrap();
    let (ok, said) = git(copy.path(), &["apply", "--check", "-"], &patch);
    assert!(ok, "git apply --check: {said}\n{}", String::from_utf8_lossy(&patch));
    // Our line counts are git's.
    let (ok, numstat) = git(copy.path(), &["apply", "--numstat", "-"], &patch);
    assert!(ok, "{numstat}");
    for line in numstat.lines() {
        let mut cols = line.split('\t');
        let (added, removed, path) = (cols.next().unwrap(), cols.next().unwrap(), cols.next().unwrap());
        let f = changes.files.iter().find(|f| f.path == path).unwrap();
        if f.binary {
            assert_eq!((added, removed), ("-", "-"), "{path}");
        } else {
            assert_eq!(
                (added, removed),
                (&*f.lines_added.to_string(), &*f.lines_removed.to_string()),
                "{path}"
            );
        }
    }
    let (ok, said) = git(copy.path(), &["apply", "-"], &patch);
    assert!(ok, "git apply: {said}");
    let mut want = content(&tree(container.path()));
    want.retain(|p, _| !p.starts_with("target/") && p != ".env");
    let mut got = content(&tree(copy.path()));
    got.remove(".env");
    assert_eq!(got, want);

    // apply() writes the same into the original, and leaves its `.env` be.
    let applied = workspace::apply(&changes, &snap, orig.path()).unwrap();
    assert_eq!(applied.written, ["assets/logo.txt", "docs", "src/lib.rs", "src/new.rs"]);
    let mut got = content(&tree(orig.path()));
    assert_eq!(got.remove(".env").unwrap().1, b"TOKEN=mine\n");
    assert_eq!(got, want);
}

#[test]
fn apply_refuses_a_changed_directory_and_an_ignored_path_in_the_way() {
    let rules = Rules {
        global_excludes: None,
        ..Rules::default()
    };
    // The user edits a file while the job runs.
    let orig = tmp();
    project(orig.path());
    let snap = workspace::select(orig.path(), &rules).unwrap();
    let mut tar = Vec::new();
    snap.write_tar(&mut tar).unwrap();
    let container = tmp();
    give_to_job(container.path());
    unpack(container.path(), &tar);
    edit(container.path());
    give_to_job(container.path());
    let out_tar = pack(container.path());
    let changes = workspace::diff(&snap, &out_tar[..], &DiffRules::new(1 << 30)).unwrap();
    put(orig.path(), "README.md", "# Project\n\nMy own edit.\n");
    let before = tree(orig.path());
    let err = workspace::apply(&changes, &snap, orig.path()).unwrap_err();
    assert!(matches!(err, WorkspaceError::Changed { .. }), "{err}");
    assert_eq!(err.exit(), Exit::Refused);
    assert!(err.to_string().contains("`README.md` modified"), "{err}");
    assert!(err.hint().unwrap().contains("git apply"));
    assert_eq!(tree(orig.path()), before, "nothing was touched");

    // An ignored directory of the user's where the job puts a file.
    let orig = tmp();
    put(orig.path(), ".gitignore", "cache/\n");
    put(orig.path(), "cache/state.db", "mine");
    put(orig.path(), "a.txt", "a\n");
    let snap = workspace::select(orig.path(), &rules).unwrap();
    let mut tar = Vec::new();
    snap.write_tar(&mut tar).unwrap();
    let container = tmp();
    give_to_job(container.path());
    unpack(container.path(), &tar);
    put(container.path(), "cache", "a file named like the ignored directory\n");
    put(container.path(), "a.txt", "b\n");
    give_to_job(container.path());
    let out_tar = pack(container.path());
    let changes = workspace::diff(&snap, &out_tar[..], &DiffRules::new(1 << 30)).unwrap();
    let before = tree(orig.path());
    let err = workspace::apply(&changes, &snap, orig.path()).unwrap_err();
    assert!(
        matches!(&err, WorkspaceError::InTheWay { path, .. } if path == "cache"),
        "{err}"
    );
    assert_eq!(err.exit(), Exit::Refused);
    assert_eq!(tree(orig.path()), before);
}
