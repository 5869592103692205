//! Selection, packing, diff and apply, end to end on real directories, with
//! git itself as the judge of the patch and of what is ignored; and the host-side
//! unpack of an archive a stranger sent.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use super::*;
use crate::exit::{Exit, HasExit};

pub(super) fn rules() -> Rules {
    Rules {
        limit_bytes: 10 * 1024 * 1024,
        include_git: false,
        global_excludes: None,
    }
}

pub(super) fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("cmm-ws-").tempdir().expect("temp dir")
}

pub(super) fn put(root: &Path, rel: &str, content: impl AsRef<[u8]>) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir -p");
    fs::write(p, content).expect("write");
}

pub(super) fn chmod(root: &Path, rel: &str, mode: u32) {
    fs::set_permissions(root.join(rel), fs::Permissions::from_mode(mode)).expect("chmod");
}

pub(super) fn link(root: &Path, target: &str, rel: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir -p");
    symlink(target, p).expect("symlink");
}

/// Files and links selected, sorted.
fn selected(s: &Snapshot) -> Vec<String> {
    s.entries()
        .filter(|e| e.kind != EntryKind::Dir)
        .map(|e| e.path.clone())
        .collect()
}

/// Run git with no user or system configuration.
pub(super) fn git(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> (bool, String) {
    let empty = tmp();
    let mut c = Command::new("git");
    c.current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", empty.path())
        .env("XDG_CONFIG_HOME", empty.path())
        .env("GIT_CEILING_DIRECTORIES", dir.parent().unwrap_or(dir))
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("git");
    if let Some(bytes) = stdin {
        child.stdin.take().expect("stdin").write_all(bytes).expect("feed git");
    }
    let out = child.wait_with_output().expect("git");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// What a tree holds, for comparison: path -> (kind, content or target, exec).
pub(super) fn tree(root: &Path) -> BTreeMap<String, (char, Vec<u8>, bool)> {
    fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, (char, Vec<u8>, bool)>) {
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
            if m.file_type().is_symlink() {
                let t = fs::read_link(e.path()).expect("readlink");
                out.insert(child, ('l', t.to_string_lossy().as_bytes().to_vec(), false));
            } else if m.is_dir() {
                out.insert(child.clone(), ('d', Vec::new(), false));
                walk(root, &child, out);
            } else {
                let exec = m.permissions().mode() & 0o100 != 0;
                out.insert(child, ('f', fs::read(e.path()).expect("read"), exec));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

/// Make a directory tree removable again after a test made parts of it
/// read-only (each directory before what it holds, so it can be listed).
pub(super) fn writable(dir: &Path) {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            writable(&e.path());
        }
    }
}

pub(super) fn files_only(t: BTreeMap<String, (char, Vec<u8>, bool)>) -> BTreeMap<String, (char, Vec<u8>, bool)> {
    t.into_iter().filter(|(_, v)| v.0 != 'd').collect()
}

pub(super) fn copy_tree(from: &Path) -> tempfile::TempDir {
    let to = tmp();
    let ok = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to.path())
        .status()
        .expect("cp");
    assert!(ok.success());
    to
}

/// The container side, in process: unpack the snapshot's tar, let `job`
/// change the tree, pack it again.
pub(super) fn run_job(snap: &Snapshot, job: impl FnOnce(&Path)) -> (tempfile::TempDir, Vec<u8>) {
    let mut tar = Vec::new();
    snap.write_tar(&mut tar).expect("write_tar");
    let container = tmp();
    unpack_into(container.path(), &tar[..]).expect("unpack");
    job(container.path());
    let mut out = Vec::new();
    pack_dir(container.path(), &mut out).expect("pack");
    (container, out)
}

pub(super) fn big() -> DiffRules {
    DiffRules::new(1 << 30)
}

/// Apply the patch with git to a copy of `original`; return the copy.
#[track_caller]
fn git_apply(original: &Path, changes: &ChangeSet) -> tempfile::TempDir {
    let copy = copy_tree(original);
    let patch = changes.patch_text().expect("patch");
    let (ok, out) = git(copy.path(), &["apply", "--check", "-"], Some(&patch));
    assert!(
        ok,
        "git apply --check refused the patch: {out}\n{}",
        String::from_utf8_lossy(&patch)
    );
    let (ok, out) = git(copy.path(), &["apply", "-"], Some(&patch));
    assert!(ok, "git apply failed: {out}");
    copy
}

// ---------------------------------------------------------------------------
// Selection

#[test]
fn snapshots_and_change_sets_can_cross_threads() {
    // The job pipeline is async: these move into blocking tasks.
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Snapshot>();
    send_sync::<ChangeSet>();
    send_sync::<WorkspaceError>();
}

#[test]
fn gitignore_applies_without_git_and_hidden_files_come_along() {
    let d = tmp();
    put(d.path(), ".gitignore", "target/\n*.log\n!keep.log\n");
    put(d.path(), ".hidden", "h");
    put(d.path(), "src/main.rs", "fn main() {}\n");
    put(d.path(), "target/debug/big", "x");
    put(d.path(), "a.log", "x");
    put(d.path(), "keep.log", "x");
    put(d.path(), "src/.gitignore", "generated.rs\n");
    put(d.path(), "src/generated.rs", "x");
    let s = select(d.path(), &rules()).unwrap();
    assert_eq!(
        selected(&s),
        [".gitignore", ".hidden", "keep.log", "src/.gitignore", "src/main.rs"]
    );
    assert_eq!(s.left_out(), 3, "target/, a.log, src/generated.rs");
    assert!(s.summary().contains("3 ignored paths left out"), "{}", s.summary());
}

#[test]
fn git_dir_is_left_out_unless_included_and_then_copied_whole() {
    let d = tmp();
    assert!(git(d.path(), &["init", "-q"], None).0);
    put(d.path(), ".gitignore", "*.pack\n");
    put(d.path(), "x.txt", "x");
    let s = select(d.path(), &rules()).unwrap();
    assert!(
        selected(&s).iter().all(|p| !p.starts_with(".git/")),
        "{:?}",
        selected(&s)
    );
    put(d.path(), ".git/objects/pack/p.pack", "pack");
    let s = select(
        d.path(),
        &Rules {
            include_git: true,
            ..rules()
        },
    )
    .unwrap();
    let paths = selected(&s);
    assert!(paths.contains(&".git/HEAD".to_string()));
    assert!(
        paths.contains(&".git/objects/pack/p.pack".to_string()),
        "no rule applies inside .git"
    );
}

#[test]
fn selection_matches_what_git_would_track() {
    let d = tmp();
    let root = d.path();
    assert!(git(root, &["init", "-q"], None).0);
    put(
        root,
        ".gitignore",
        "*.o\nbuild/\n/only-top\ndocs/*\n!docs/keep.md\nnode_modules\n",
    );
    put(root, "a.o", "x");
    put(root, "src/b.o", "x");
    put(root, "src/b.c", "x");
    put(root, "build/out", "x");
    put(root, "src/build/out", "x");
    put(root, "only-top", "x");
    put(root, "src/only-top", "x");
    put(root, "docs/drop.md", "x");
    put(root, "docs/keep.md", "x");
    put(root, "node_modules/m/index.js", "x");
    put(root, "lib/.gitignore", "!*.o\nsecret*\n");
    put(root, "lib/c.o", "x");
    put(root, "lib/secret.txt", "x");
    put(root, "lib/deep/secret2", "x");
    put(root, "excluded-by-info", "x");
    put(root, ".git/info/exclude", "excluded-by-info\n");
    put(root, "personal.swp", "x");
    put(root, ".env", "TOKEN=1\n");
    put(root, "README", "x");
    link(root, "README", "readme-link");
    let global = tmp();
    put(global.path(), "ignore", "*.swp\n");
    let excludes = global.path().join("ignore");
    let r = Rules {
        global_excludes: Some(excludes.clone()),
        ..rules()
    };
    let s = select(root, &r).unwrap();
    let (ok, listed) = git(
        root,
        &[
            "-c",
            &format!("core.excludesFile={}", excludes.display()),
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
        ],
        None,
    );
    assert!(ok, "{listed}");
    let mut want: Vec<String> = listed.lines().map(str::to_string).collect();
    want.sort();
    assert_eq!(selected(&s), want);
    assert!(want.contains(&"lib/c.o".to_string()) && want.contains(&".env".to_string()));
}

#[test]
fn parent_gitignore_counts_only_inside_a_repository() {
    // Not a repository: a `*` in the parent's .gitignore means nothing here.
    let outer = tmp();
    put(outer.path(), ".gitignore", "*\n");
    put(outer.path(), "proj/src/a.rs", "a");
    let s = select(&outer.path().join("proj"), &rules()).unwrap();
    assert_eq!(selected(&s), ["src/a.rs"]);

    // Inside one: the top's rules reach down into the subdirectory we copy.
    let repo = tmp();
    assert!(git(repo.path(), &["init", "-q"], None).0);
    put(repo.path(), ".gitignore", "*.log\nsub/tmp/\n");
    put(repo.path(), ".git/info/exclude", "local.txt\n");
    put(repo.path(), "sub/a.log", "x");
    put(repo.path(), "sub/tmp/x", "x");
    put(repo.path(), "sub/local.txt", "x");
    put(repo.path(), "sub/keep.rs", "x");
    let s = select(&repo.path().join("sub"), &rules()).unwrap();
    assert_eq!(selected(&s), ["keep.rs"]);
}

#[test]
fn too_big_names_size_limit_and_biggest_paths() {
    let d = tmp();
    put(d.path(), "data/huge.bin", vec![1u8; 300_000]);
    put(d.path(), "data/other.bin", vec![1u8; 100_000]);
    put(d.path(), "src/a.rs", "a");
    let err = select(
        d.path(),
        &Rules {
            limit_bytes: 200_000,
            ..rules()
        },
    )
    .unwrap_err();
    assert_eq!(err.exit(), Exit::Usage);
    let msg = err.to_string();
    assert!(msg.contains("390.6 KiB"), "{msg}");
    assert!(msg.contains("195.3 KiB"), "{msg}");
    assert!(msg.contains("`data/` 390.6 KiB"), "{msg}");
    assert!(msg.contains("`data/huge.bin` 293.0 KiB"), "{msg}");
    let hint = err.hint().unwrap();
    assert!(hint.contains(".gitignore") && hint.contains("/data/"), "{hint}");
}

#[test]
fn links_inside_are_kept_as_links_and_links_outside_refused() {
    let d = tmp();
    put(d.path(), "real/f.txt", "f");
    link(d.path(), "real", "dir-link");
    link(d.path(), "../real/f.txt", "sub/file-link");
    link(d.path(), "missing", "dangling");
    let s = select(d.path(), &rules()).unwrap();
    let e = s.get("dir-link").unwrap();
    assert_eq!(e.kind, EntryKind::Symlink);
    assert_eq!(e.link_target.as_deref(), Some("real"));
    assert!(
        s.get("dir-link/f.txt").is_none(),
        "a link to a directory is not followed"
    );
    assert!(s.get("sub/file-link").is_some() && s.get("dangling").is_some());

    for (target, name) in [
        ("/etc/passwd", "abs"),
        ("../../outside", "sub/up"),
        ("real/../..", "sneaky"),
    ] {
        let d = tmp();
        put(d.path(), "real/f.txt", "f");
        link(d.path(), target, name);
        let err = select(d.path(), &rules()).unwrap_err();
        assert!(matches!(err, WorkspaceError::LinkOutside { .. }), "{target}: {err}");
        assert_eq!(err.exit(), Exit::Usage);
        assert!(err.to_string().contains(&format!("`{name}`")), "{err}");
    }
    // Through another link: `up -> ..` would be fine alone, but not `x -> up/..`
    // when `up` is itself a link that leaves.
    let d = tmp();
    put(d.path(), "d/f", "f");
    link(d.path(), "..", "d/up");
    link(d.path(), "d/up/..", "x");
    let err = select(d.path(), &rules()).unwrap_err();
    assert!(err.to_string().contains("`x`"), "{err}");
}

#[test]
fn fifos_and_sockets_are_refused_unless_ignored() {
    let d = tmp();
    put(d.path(), "a.txt", "a");
    let fifo = std::ffi::CString::new(d.path().join("pipe").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let err = select(d.path(), &rules()).unwrap_err();
    assert!(
        matches!(&err, WorkspaceError::SpecialFile { path, kind: "fifo", .. } if path == "pipe"),
        "{err}"
    );
    assert!(err.hint().unwrap().contains("`pipe`"));
    put(d.path(), ".gitignore", "pipe\nsock\n");
    let _sock = std::os::unix::net::UnixListener::bind(d.path().join("sock")).unwrap();
    let s = select(d.path(), &rules()).unwrap();
    assert_eq!(selected(&s), [".gitignore", "a.txt"]);
    fs::remove_file(d.path().join(".gitignore")).unwrap();
    let err = select(d.path(), &rules()).unwrap_err();
    assert!(err.to_string().contains("is a fifo"), "{err}");
}

#[test]
fn names_that_are_not_utf8_are_refused_unless_ignored() {
    use std::os::unix::ffi::OsStrExt;
    let d = tmp();
    let bad = std::ffi::OsStr::from_bytes(b"caf\xe9.txt");
    fs::write(d.path().join(bad), "x").unwrap();
    let err = select(d.path(), &rules()).unwrap_err();
    assert!(matches!(err, WorkspaceError::BadName { .. }), "{err}");
    put(d.path(), ".gitignore", "caf*\n");
    assert_eq!(selected(&select(d.path(), &rules()).unwrap()), [".gitignore"]);
}

#[test]
fn not_a_directory_is_a_usage_error() {
    let d = tmp();
    put(d.path(), "file", "x");
    for p in [d.path().join("file"), d.path().join("missing")] {
        let err = select(&p, &rules()).unwrap_err();
        assert!(matches!(err, WorkspaceError::NotADirectory { .. }), "{err}");
        assert_eq!(err.exit(), Exit::Usage);
    }
}

/// Unreadable files: as root nothing is, so the check runs as uid 10001
/// in a child of this test binary (the parent arranges the files).
#[test]
fn unreadable_files_are_refused() {
    const CHILD: &str = "CMM_TEST_UNREADABLE_DIR";
    if let Ok(dir) = std::env::var(CHILD) {
        let err = select(Path::new(&dir), &rules()).unwrap_err();
        assert!(
            matches!(&err, WorkspaceError::Unreadable { path, .. } if path == "secret"),
            "{err}"
        );
        assert_eq!(err.exit(), Exit::Usage);
        assert!(err.hint().unwrap().contains("chmod u+r"));
        return;
    }
    let d = tmp();
    put(d.path(), "ok.txt", "x");
    put(d.path(), "secret", "x");
    chmod(d.path(), "secret", 0o000);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let err = select(d.path(), &rules()).unwrap_err();
        assert!(matches!(&err, WorkspaceError::Unreadable { path, .. } if path == "secret"));
        return;
    }
    chmod(d.path(), "", 0o755);
    for p in ["", "ok.txt", "secret"] {
        std::os::unix::fs::lchown(d.path().join(p), Some(10001), Some(10001)).unwrap();
    }
    use std::os::unix::process::CommandExt;
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "workspace::tests::unreadable_files_are_refused",
            "--nocapture",
        ])
        .env(CHILD, d.path())
        .uid(10001)
        .gid(10001)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_snapshot_keeps_the_original_bytes() {
    let d = tmp();
    put(d.path(), "a.txt", "before\n");
    let s = select(d.path(), &rules()).unwrap();
    put(d.path(), "a.txt", "after, and longer\n");
    let c = tmp();
    let mut tar = Vec::new();
    s.write_tar(&mut tar).unwrap();
    unpack_into(c.path(), &tar[..]).unwrap();
    assert_eq!(fs::read_to_string(c.path().join("a.txt")).unwrap(), "before\n");
}

#[test]
fn the_tar_is_relative_sorted_deterministic_and_owned_by_the_job_user() {
    let d = tmp();
    put(d.path(), "b/z.txt", "z");
    put(d.path(), "a.sh", "#!/bin/sh\n");
    chmod(d.path(), "a.sh", 0o4755);
    link(d.path(), "a.sh", "b/link");
    put(d.path(), &format!("long/{}/f", "n".repeat(150)), "deep");
    let s = select(d.path(), &rules()).unwrap();
    let (mut one, mut two) = (Vec::new(), Vec::new());
    s.write_tar(&mut one).unwrap();
    select(d.path(), &rules()).unwrap().write_tar(&mut two).unwrap();
    assert_eq!(one, two, "the same tree packs to the same bytes");
    let mut ar = tar::Archive::new(&one[..]);
    let mut seen = Vec::new();
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        let h = e.header();
        assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (10001, 10001));
        assert_eq!(h.username().unwrap(), Some(""));
        let path = e.path().unwrap().to_string_lossy().to_string();
        if path == "a.sh" {
            assert_eq!(h.mode().unwrap(), 0o755, "setuid dropped, the rest kept");
        }
        if path == "b/link" {
            assert_eq!(h.entry_type(), tar::EntryType::Symlink);
            assert_eq!(e.link_name().unwrap().unwrap().to_str(), Some("a.sh"));
        }
        seen.push(path);
    }
    let long = format!("long/{}/f", "n".repeat(150));
    assert_eq!(
        seen,
        [
            "a.sh",
            "b/",
            "b/link",
            "b/z.txt",
            "long/",
            &format!("long/{}/", "n".repeat(150)),
            &long
        ]
    );
}

// ---------------------------------------------------------------------------
// Diff and patch

pub(super) fn sample() -> tempfile::TempDir {
    let d = tmp();
    put(d.path(), ".gitignore", "target/\n.env\nnode_modules/\n");
    put(d.path(), ".env", "SECRET=1\n");
    put(d.path(), "README.md", "# Title\n\nline\n");
    put(
        d.path(),
        "src/lib.rs",
        (1..=40).map(|i| format!("line {i}\n")).collect::<String>(),
    );
    put(d.path(), "src/gone.rs", "bye\n");
    put(d.path(), "run.sh", "#!/bin/sh\necho hi\n");
    put(d.path(), "data.txt", "text for now\n");
    put(d.path(), "no-newline.txt", "last line");
    put(d.path(), "name with spaces.txt", "s\n");
    put(d.path(), "caf\u{e9}.txt", "u\n");
    link(d.path(), "README.md", "readme");
    d
}

#[test]
fn a_diff_of_every_kind_of_change_applies_with_git() {
    let orig = sample();
    let s = select(orig.path(), &rules()).unwrap();
    assert!(s.get(".env").is_none());
    let (container, out) = run_job(&s, |c| {
        put(c, "src/new.rs", "pub fn new() {}\n");
        let mut lib: String = (1..=40).map(|i| format!("line {i}\n")).collect();
        lib = lib.replace("line 3\n", "line three\n").replace("line 30\n", "");
        put(c, "src/lib.rs", lib);
        fs::remove_file(c.join("src/gone.rs")).unwrap();
        chmod(c, "run.sh", 0o755);
        put(c, "data.txt", [0u8, 1, 2, 3, 255, 0, 10]);
        put(c, "no-newline.txt", "last line\n");
        put(c, "name with spaces.txt", "s2\n");
        put(c, "caf\u{e9}.txt", "u2\n");
        fs::remove_file(c.join("readme")).unwrap();
        symlink("src/lib.rs", c.join("readme")).unwrap();
        put(c, "empty", "");
        put(c, "target/debug/app", vec![7u8; 1000]);
        put(c, "node_modules/x/index.js", "x");
        put(c, ".env", "SECRET=from the job\n");
    });
    let changes = diff(&s, &out[..], &big()).unwrap();
    let kinds: BTreeMap<&str, ChangeKind> = changes.files.iter().map(|f| (f.path.as_str(), f.change)).collect();
    assert_eq!(kinds["src/new.rs"], ChangeKind::Added);
    assert_eq!(kinds["empty"], ChangeKind::Added);
    assert_eq!(kinds["src/lib.rs"], ChangeKind::Modified);
    assert_eq!(kinds["src/gone.rs"], ChangeKind::Deleted);
    assert_eq!(kinds["run.sh"], ChangeKind::ModeChanged);
    assert_eq!(kinds["data.txt"], ChangeKind::Modified);
    assert_eq!(kinds["readme"], ChangeKind::Modified);
    assert!(!kinds.contains_key(".env") && !kinds.contains_key("target/debug/app"));
    let data = changes.files.iter().find(|f| f.path == "data.txt").unwrap();
    assert!(data.binary && data.in_patch);
    let lib = changes.files.iter().find(|f| f.path == "src/lib.rs").unwrap();
    assert_eq!((lib.lines_added, lib.lines_removed), (1, 2));
    assert_eq!(changes.ignored.count, 3, "{:?}", changes.ignored);
    assert_eq!(changes.ignored.paths, [".env", "node_modules", "target"]);
    assert_eq!(changes.totals.files_changed, 10);
    assert!(changes.patch.complete);
    assert!(
        changes
            .summary
            .starts_with("10 files changed: 2 added, 6 modified, 1 deleted, 1 mode changed (+"),
        "{}",
        changes.summary
    );
    assert!(
        changes.summary.ends_with("; 1 binary; 3 ignored paths left out"),
        "{}",
        changes.summary
    );
    let patch = String::from_utf8_lossy(&changes.patch_text().unwrap()).into_owned();
    for needle in [
        "diff --git a/src/new.rs b/src/new.rs\nnew file mode 100644\n",
        "diff --git a/src/gone.rs b/src/gone.rs\ndeleted file mode 100644\n",
        "--- /dev/null\n+++ b/src/new.rs\n",
        "diff --git a/run.sh b/run.sh\nold mode 100644\nnew mode 100755\n",
        "\\ No newline at end of file\n",
        "GIT binary patch\nliteral 7\n",
        "diff --git \"a/caf\\303\\251.txt\" \"b/caf\\303\\251.txt\"\n",
    ] {
        assert!(patch.contains(needle), "patch lacks {needle:?}:\n{patch}");
    }
    assert_eq!(changes.patch.bytes as usize, patch.len());
    assert_eq!(
        changes.patch.sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(patch.as_bytes()))
    );

    // git applies it to a copy of the original and gets the job's tree
    // (less what the rules leave out).
    let applied = git_apply(orig.path(), &changes);
    let mut want = files_only(tree(container.path()));
    want.retain(|p, _| !p.starts_with("target/") && !p.starts_with("node_modules/") && p != ".env");
    let mut got = files_only(tree(applied.path()));
    got.remove(".env");
    assert_eq!(got, want);

    // The JSON shape for `execute --json`.
    let v = serde_json::to_value(&changes).unwrap();
    assert_eq!(v["files_changed"], 10);
    assert_eq!(v["ignored"]["count"], 3);
    assert_eq!(v["patch"]["sha256"], changes.patch.sha256);
    let f = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "data.txt")
        .unwrap();
    assert_eq!(f["change"], "modified");
    assert_eq!(f["binary"], true);
    assert_eq!(f["new_size"], 7);
    assert_eq!(f["old_mode"], "100644");
}

#[test]
fn changes_of_kind_apply_with_git_too() {
    let orig = tmp();
    put(orig.path(), "was-dir/a.txt", "a\n");
    put(orig.path(), "was-dir/b/c.txt", "c\n");
    put(orig.path(), "was-file", "f\n");
    put(orig.path(), "file-to-link", "x\n");
    link(orig.path(), "was-file", "link-to-file");
    let s = select(orig.path(), &rules()).unwrap();
    let (container, out) = run_job(&s, |c| {
        fs::remove_dir_all(c.join("was-dir")).unwrap();
        put(c, "was-dir", "now a file\n");
        fs::remove_file(c.join("was-file")).unwrap();
        put(c, "was-file/inside.txt", "now a dir\n");
        fs::remove_file(c.join("file-to-link")).unwrap();
        symlink("was-dir", c.join("file-to-link")).unwrap();
        fs::remove_file(c.join("link-to-file")).unwrap();
        put(c, "link-to-file", "a file now\n");
        fs::create_dir(c.join("empty-dir")).unwrap();
    });
    let changes = diff(&s, &out[..], &big()).unwrap();
    let kinds: BTreeMap<&str, ChangeKind> = changes.files.iter().map(|f| (f.path.as_str(), f.change)).collect();
    assert_eq!(kinds["file-to-link"], ChangeKind::TypeChanged);
    assert_eq!(kinds["link-to-file"], ChangeKind::TypeChanged);
    assert_eq!(kinds["was-dir"], ChangeKind::Added);
    assert_eq!(kinds["was-dir/a.txt"], ChangeKind::Deleted);
    assert_eq!(kinds["was-file"], ChangeKind::Deleted);
    assert_eq!(changes.dirs_removed, ["was-dir", "was-dir/b"]);
    assert_eq!(changes.dirs_added, ["empty-dir", "was-file"]);
    let applied = git_apply(orig.path(), &changes);
    assert_eq!(files_only(tree(applied.path())), files_only(tree(container.path())));

    // And apply() gets the same, empty directory included.
    let done = apply(&changes, &s, orig.path()).unwrap();
    assert_eq!(tree(orig.path()), tree(container.path()));
    assert_eq!(done.dirs_removed, ["was-dir/b", "was-dir"]);
    assert_eq!(done.dirs_created, ["empty-dir", "was-file"]);
}

#[test]
fn big_binaries_are_noted_not_carried() {
    let orig = tmp();
    put(orig.path(), "blob.bin", [0u8; 10]);
    let s = select(orig.path(), &rules()).unwrap();
    let (_c, out) = run_job(&s, |c| put(c, "blob.bin", vec![0u8; 5000]));
    let changes = diff(
        &s,
        &out[..],
        &DiffRules {
            max_binary_patch_bytes: 100,
            ..big()
        },
    )
    .unwrap();
    assert!(!changes.patch.complete && !changes.files[0].in_patch);
    let patch = String::from_utf8(changes.patch_text().unwrap()).unwrap();
    assert!(
        patch.contains("Binary files a/blob.bin and b/blob.bin differ\n"),
        "{patch}"
    );
    assert!(
        changes.summary.contains("1 change not in the patch"),
        "{}",
        changes.summary
    );
    // apply() has the bytes all the same.
    apply(&changes, &s, orig.path()).unwrap();
    assert_eq!(fs::read(orig.path().join("blob.bin")).unwrap(), vec![0u8; 5000]);
}

#[test]
fn links_the_job_points_outside_are_skipped() {
    let orig = tmp();
    put(orig.path(), "a.txt", "a");
    link(orig.path(), "a.txt", "ok-link");
    let s = select(orig.path(), &rules()).unwrap();
    let (_c, out) = run_job(&s, |c| {
        symlink("/home/someone/.ssh/authorized_keys", c.join("evil")).unwrap();
        fs::remove_file(c.join("ok-link")).unwrap();
        symlink("../../etc", c.join("ok-link")).unwrap();
    });
    let changes = diff(&s, &out[..], &big()).unwrap();
    assert!(changes.files.is_empty(), "{:?}", changes.files);
    let skipped: Vec<&str> = changes.skipped.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(skipped, ["evil", "ok-link"]);
    assert!(changes.summary.contains("2 paths skipped"), "{}", changes.summary);
}

#[path = "../../tests/common/raw_tar.rs"]
pub(super) mod raw_tar;
use raw_tar::raw_tar;

#[test]
fn hostile_archives_are_refused_by_the_diff() {
    let orig = tmp();
    put(orig.path(), "a.txt", "a");
    let s = select(orig.path(), &rules()).unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            raw_tar(&[(b"/etc/passwd", tar::EntryType::Regular, b"x", b"")]),
            "absolute",
        ),
        (raw_tar(&[(b"a/../../x", tar::EntryType::Regular, b"x", b"")]), "`..`"),
        (
            raw_tar(&[
                (b"f", tar::EntryType::Regular, b"x", b""),
                (b"f/g", tar::EntryType::Regular, b"x", b""),
            ]),
            "not a directory",
        ),
        (
            raw_tar(&[
                (b"f", tar::EntryType::Regular, b"x", b""),
                (b"f", tar::EntryType::Regular, b"y", b""),
            ]),
            "twice",
        ),
    ];
    for (tar, want) in cases {
        let err = diff(&s, &tar[..], &big()).unwrap_err();
        assert!(matches!(err, WorkspaceError::Archive(_)), "{err}");
        assert!(err.to_string().contains(want), "{err}");
        assert_eq!(err.exit(), Exit::Failed);
    }
    // The bound cuts a file short: refused as too big, not as malformed.
    let c = tmp();
    put(c.path(), "a.txt", "a");
    put(c.path(), "big", vec![b'x'; 20_000]);
    let mut out = Vec::new();
    pack_dir(c.path(), &mut out).unwrap();
    let err = diff(&s, &out[..], &DiffRules::new(10_000)).unwrap_err();
    assert!(matches!(err, WorkspaceError::OutputTooBig { limit: 10_000 }), "{err}");
    assert_eq!(err.exit(), Exit::Failed);
    assert_eq!(
        diff(&s, &out[..], &DiffRules::new(out.len() as u64))
            .unwrap()
            .files
            .len(),
        1
    );
    // Hard links and devices are not ours to write: skipped and said so.
    let tar = raw_tar(&[(b"hard", tar::EntryType::Link, b"", b"a.txt")]);
    let changes = diff(&s, &tar[..], &big()).unwrap();
    assert_eq!(changes.skipped[0].path, "hard");
}

// ---------------------------------------------------------------------------
// Apply

#[test]
fn apply_writes_the_jobs_tree_and_only_that() {
    let orig = sample();
    let s = select(orig.path(), &rules()).unwrap();
    let (container, out) = run_job(&s, |c| {
        put(c, "src/new/deep.rs", "deep\n");
        put(c, "src/lib.rs", "rewritten\n");
        fs::remove_file(c.join("src/gone.rs")).unwrap();
        chmod(c, "run.sh", 0o755);
        put(c, "data.txt", [0u8, 1, 2]);
        put(c, "target/x", "built");
    });
    let changes = diff(&s, &out[..], &big()).unwrap();
    chmod(orig.path(), "README.md", 0o640);
    // The user changed a mode meanwhile: refused. Put it back: applied.
    let err = apply(&changes, &s, orig.path()).unwrap_err();
    assert!(err.to_string().contains("`README.md` mode changed"), "{err}");
    chmod(orig.path(), "README.md", 0o644);
    let done = apply(&changes, &s, orig.path()).unwrap();
    assert_eq!(done.written, ["data.txt", "src/lib.rs", "src/new/deep.rs"]);
    assert_eq!(done.deleted, ["src/gone.rs"]);
    assert_eq!(done.mode_changed, ["run.sh"]);
    assert_eq!(done.dirs_created, ["src/new"]);
    assert!(done.summary().starts_with("applied 5 changes"), "{}", done.summary());
    let mut want = files_only(tree(container.path()));
    want.remove("target/x");
    let mut got = files_only(tree(orig.path()));
    assert_eq!(got.remove(".env").map(|v| v.1), Some(b"SECRET=1\n".to_vec()));
    assert_eq!(got, want);
    let mode = |p: &str| fs::metadata(orig.path().join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("run.sh"), 0o755);
    assert_eq!(mode("src/lib.rs"), 0o644, "a rewritten file keeps its mode");
    assert!(
        !tree(orig.path()).keys().any(|p| p.contains(".cmm-new-")),
        "no staged file is left behind"
    );
}

#[test]
fn apply_refuses_when_the_directory_changed_and_touches_nothing() {
    for change in ["modify", "add", "delete", "link"] {
        let orig = sample();
        let s = select(orig.path(), &rules()).unwrap();
        let (_c, out) = run_job(&s, |c| put(c, "README.md", "by the job\n"));
        let changes = diff(&s, &out[..], &big()).unwrap();
        match change {
            "modify" => put(orig.path(), "src/lib.rs", "mine\n"),
            "add" => put(orig.path(), "notes.txt", "mine\n"),
            "delete" => fs::remove_file(orig.path().join("data.txt")).unwrap(),
            _ => {
                fs::remove_file(orig.path().join("readme")).unwrap();
                symlink("run.sh", orig.path().join("readme")).unwrap();
            }
        }
        let before = tree(orig.path());
        let err = apply(&changes, &s, orig.path()).unwrap_err();
        assert!(matches!(err, WorkspaceError::Changed { .. }), "{change}: {err}");
        assert_eq!(err.exit(), Exit::Refused);
        let want = match change {
            "modify" => "`src/lib.rs` modified",
            "add" => "`notes.txt` added",
            "delete" => "`data.txt` deleted",
            _ => "`readme` modified",
        };
        assert!(err.to_string().contains(want), "{change}: {err}");
        assert_eq!(tree(orig.path()), before, "{change}: nothing touched");
    }
}

#[test]
fn apply_never_overwrites_an_ignored_path() {
    // `cache/` names directories only: the user's ignored `cache/` stays
    // home, and the job (which never saw it) makes a file `cache`.
    let orig = tmp();
    put(orig.path(), ".gitignore", "cache/\n");
    put(orig.path(), "cache/state", "mine\n");
    put(orig.path(), "a.txt", "a\n");
    let s = select(orig.path(), &rules()).unwrap();
    assert!(s.get("cache").is_none());
    let (_c, out) = run_job(&s, |c| {
        put(c, "cache", "the job's\n");
        put(c, "a.txt", "changed\n");
    });
    let changes = diff(&s, &out[..], &big()).unwrap();
    assert!(changes
        .files
        .iter()
        .any(|f| f.path == "cache" && f.change == ChangeKind::Added));
    let before = tree(orig.path());
    let err = apply(&changes, &s, orig.path()).unwrap_err();
    assert!(
        matches!(&err, WorkspaceError::InTheWay { path, .. } if path == "cache"),
        "{err}"
    );
    assert_eq!(err.exit(), Exit::Refused);
    assert!(err.to_string().contains("ignored"), "{err}");
    assert_eq!(tree(orig.path()), before, "nothing touched, a.txt included");

    // An ignored `.env` is never overwritten, even by a change set that
    // (against the rules) adds one.
    let orig = tmp();
    put(orig.path(), ".gitignore", ".env\n");
    put(orig.path(), ".env", "SECRET=mine\n");
    put(orig.path(), "a.txt", "a\n");
    let s = select(orig.path(), &rules()).unwrap();
    let (_c, out) = run_job(&s, |c| put(c, "a.txt", "b\n"));
    let mut changes = diff(&s, &out[..], &big()).unwrap();
    let mut forged = changes.files[0].clone();
    forged.path = ".env".into();
    forged.change = ChangeKind::Added;
    changes.files.insert(0, forged);
    let err = apply(&changes, &s, orig.path()).unwrap_err();
    assert!(
        matches!(&err, WorkspaceError::InTheWay { path, .. } if path == ".env"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(orig.path().join(".env")).unwrap(), "SECRET=mine\n");
    assert_eq!(fs::read_to_string(orig.path().join("a.txt")).unwrap(), "a\n");
}

#[test]
fn apply_checks_the_change_set_belongs_to_the_snapshot() {
    let a = sample();
    let s1 = select(a.path(), &rules()).unwrap();
    put(a.path(), "extra", "x");
    let s2 = select(a.path(), &rules()).unwrap();
    let (_c, out) = run_job(&s1, |c| put(c, "README.md", "x\n"));
    let changes = diff(&s1, &out[..], &big()).unwrap();
    assert!(matches!(
        apply(&changes, &s2, a.path()),
        Err(WorkspaceError::WrongSnapshot)
    ));
}

// ---------------------------------------------------------------------------
// Hostile workspace archives, unpacked on the provider's host

fn unpack_err(tar: &[u8], max_bytes: u64, max_entries: u64) -> (WorkspaceError, tempfile::TempDir) {
    let base = tmp();
    let dir = base.path().join("ws");
    fs::create_dir(&dir).unwrap();
    fs::create_dir(base.path().join("victim")).unwrap();
    let err = unpack_untrusted(&dir, tar, max_bytes, max_entries).unwrap_err();
    assert_eq!(
        fs::read_dir(base.path().join("victim")).unwrap().count(),
        0,
        "wrote outside: {err}"
    );
    (err, base)
}

#[test]
fn hostile_workspace_archives_are_refused_on_the_host() {
    let r = tar::EntryType::Regular;
    let l = tar::EntryType::Symlink;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("absolute", raw_tar(&[(b"/tmp/x", r, b"x", b"")]), "`/tmp/x`"),
        ("climbs", raw_tar(&[(b"a/../../victim/x", r, b"x", b"")]), "`..`"),
        (
            "below a link",
            raw_tar(&[
                (b"sub/", tar::EntryType::Directory, b"", b""),
                (b"l", l, b"", b"sub"),
                (b"l/x", r, b"x", b""),
            ]),
            "through a symbolic link",
        ),
        (
            "below its link out",
            raw_tar(&[(b"l", l, b"", b"../victim"), (b"l/x", r, b"x", b"")]),
            "through a symbolic link",
        ),
        ("link out", raw_tar(&[(b"l", l, b"", b"../victim")]), "leads outside"),
        (
            "absolute link",
            raw_tar(&[(b"l", l, b"", b"/etc/passwd")]),
            "leads outside",
        ),
        (
            "links that add up to out",
            raw_tar(&[(b"x", l, b"", b"d/up/.."), (b"d/up", l, b"", b"..")]),
            "leads outside",
        ),
        (
            "below a file",
            raw_tar(&[(b"f", r, b"x", b""), (b"f/g", r, b"x", b"")]),
            "symbolic link or a file",
        ),
        (
            "hard link",
            raw_tar(&[(b"a", r, b"x", b""), (b"h", tar::EntryType::Link, b"", b"a")]),
            "Link entry",
        ),
        (
            "device",
            raw_tar(&[(b"d", tar::EntryType::Char, b"", b"")]),
            "Char entry",
        ),
        ("fifo", raw_tar(&[(b"p", tar::EntryType::Fifo, b"", b"")]), "Fifo entry"),
        ("twice", raw_tar(&[(b"f", r, b"1", b""), (b"f", r, b"2", b"")]), "twice"),
        (
            "a link over a directory",
            raw_tar(&[(b"d/", tar::EntryType::Directory, b"", b""), (b"d", l, b"", b".")]),
            "twice",
        ),
        ("not UTF-8", raw_tar(&[(b"caf\xe9", r, b"x", b"")]), "not valid UTF-8"),
        (
            "link target not UTF-8",
            raw_tar(&[(b"l", l, b"", b"\xff")]),
            "not valid UTF-8",
        ),
    ];
    for (name, tar, want) in cases {
        let (err, _base) = unpack_err(&tar, 1 << 20, 1000);
        assert!(
            matches!(
                err,
                WorkspaceError::Refused {
                    input: Untrusted::Workspace,
                    path: Some(_),
                    ..
                }
            ),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(want), "{name}: want {want:?} in: {err}");
        assert!(
            err.to_string()
                .starts_with("the workspace archive sent with the task is refused at `"),
            "{err}"
        );
        assert_eq!(err.exit(), Exit::Failed);
        assert!(err.hint().unwrap().starts_with("decline the task"));
    }

    // Garbage is refused as a whole.
    let (err, _b) = unpack_err(&[7u8; 1024], 1 << 20, 1000);
    assert!(matches!(err, WorkspaceError::Refused { path: None, .. }), "{err}");
}

#[test]
fn workspace_archives_are_bounded_in_bytes_and_entries() {
    let r = tar::EntryType::Regular;
    // Content over the bound.
    let tar = raw_tar(&[(b"big", r, &[b'x'; 10_000], b"")]);
    let (err, _b) = unpack_err(&tar, 8_000, 1000);
    assert!(
        matches!(
            err,
            WorkspaceError::OverBound {
                what: Bound::Bytes,
                limit: 8_000,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("more than 7.8 KiB"), "{err}");
    // Headers count too: many empty files.
    let names: Vec<String> = (0..40).map(|i| format!("f{i}")).collect();
    let entries: Vec<_> = names.iter().map(|n| (n.as_bytes(), r, &b""[..], &b""[..])).collect();
    let tar = raw_tar(&entries);
    let (err, _b) = unpack_err(&tar, 10_000, 1000);
    assert!(
        matches!(err, WorkspaceError::OverBound { what: Bound::Bytes, .. }),
        "{err}"
    );
    // Entries over the bound, and directories a path implies count.
    let (err, _b) = unpack_err(&tar, 1 << 20, 39);
    assert!(
        matches!(
            err,
            WorkspaceError::OverBound {
                what: Bound::Entries,
                limit: 39,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("more than 39 entries"), "{err}");
    let deep = raw_tar(&[(b"a/b/c/d/e/f", r, b"x", b"")]);
    let (err, _b) = unpack_err(&deep, 1 << 20, 5);
    assert!(
        matches!(
            err,
            WorkspaceError::OverBound {
                what: Bound::Entries,
                ..
            }
        ),
        "{err}"
    );
    // At the bounds exactly, it unpacks.
    let dir = tmp();
    let counts = unpack_untrusted(dir.path(), &tar[..], tar.len() as u64, 40).unwrap();
    assert_eq!(counts.files, 40);
    let dir = tmp();
    unpack_untrusted(dir.path(), &deep[..], 1 << 20, 6).unwrap();
    assert_eq!(fs::read(dir.path().join("a/b/c/d/e/f")).unwrap(), b"x");
}

#[test]
fn unpacked_modes_lose_setuid_and_stay_the_owners_to_remove() {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    add("locked/", tar::EntryType::Directory, 0o000, b"");
    add("locked/f", tar::EntryType::Regular, 0o000, b"secret");
    add("suid", tar::EntryType::Regular, 0o4755, b"#!/bin/sh\n");
    add("sticky/", tar::EntryType::Directory, 0o1777, b"");
    let tar = b.into_inner().unwrap();
    let dir = tmp();
    unpack_untrusted(dir.path(), &tar[..], 1 << 20, 100).unwrap();
    let mode = |p: &str| fs::symlink_metadata(dir.path().join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("suid"), 0o755);
    assert_eq!(mode("sticky"), 0o777);
    assert_eq!(mode("locked"), 0o700);
    assert_eq!(mode("locked/f"), 0o600);
    assert_eq!(fs::read(dir.path().join("locked/f")).unwrap(), b"secret");
    // Inside the container our own archive keeps its modes.
    let own = tmp();
    unpack_into(own.path(), &tar[..]).unwrap();
    let own_mode = |p: &str| fs::symlink_metadata(own.path().join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(own_mode("locked/f"), 0o000);
    writable(own.path());
    // The TempDirs remove themselves: the point of owner access.
    drop(dir);
}
