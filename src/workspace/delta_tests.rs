//! A workspace's trip across the market and back, on real directories:
//! the requester's snapshot unpacked on the "provider" as a stranger's, a
//! job run and applied there, its delta packed, and the job's tree rebuilt
//! on the "requester", whose own change set must be exactly the one a
//! local job would have given. Then the hostile versions of both inputs.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};

use super::tests::{big, chmod, copy_tree, link, put, rules, run_job, sample, tmp, tree, writable};
use super::*;
use crate::exit::{Exit, HasExit};

use super::tests::raw_tar::raw_tar;

/// The job both sides run: one edit of every kind.
fn edit(c: &Path) {
    put(c, "src/lib.rs", "rewritten\n");
    put(c, "src/new/deep/mod.rs", "pub mod deep;\n");
    fs::remove_file(c.join("src/gone.rs")).unwrap();
    chmod(c, "run.sh", 0o755);
    put(c, "data.txt", [0u8, 1, 2, 3, 255, 0, 10]);
    fs::remove_file(c.join("readme")).unwrap();
    symlink("src/lib.rs", c.join("readme")).unwrap();
    // A file becomes a link, a directory a file, a file a directory.
    fs::remove_file(c.join("to-link")).unwrap();
    symlink("README.md", c.join("to-link")).unwrap();
    fs::remove_dir_all(c.join("was-dir")).unwrap();
    put(c, "was-dir", "now a file\n");
    fs::remove_file(c.join("was-file")).unwrap();
    put(c, "was-file/inner.txt", "inner\n");
    // A directory goes with all it holds; an empty one comes.
    fs::remove_dir_all(c.join("old")).unwrap();
    fs::create_dir(c.join("empty-new")).unwrap();
    // What the rules leave out does not come back.
    put(c, "target/debug/app", vec![7u8; 1000]);
    put(c, ".env", "SECRET=from the job\n");
}

fn requester_dir() -> tempfile::TempDir {
    let d = sample();
    put(d.path(), "to-link", "plain\n");
    put(d.path(), "was-dir/a.txt", "a\n");
    put(d.path(), "was-file", "f\n");
    put(d.path(), "old/x.txt", "x\n");
    put(d.path(), "old/sub/y.bin", [0u8, 9, 9]);
    put(d.path(), "ro/keep.txt", "read-only dir\n");
    chmod(d.path(), "ro", 0o555);
    d
}

/// The provider's half: unpack the requester's tar as a stranger's, select
/// it as sent, run `job`, apply its changes there, pack the delta.
fn provider(tar: &[u8], job: impl FnOnce(&Path)) -> (tempfile::TempDir, serde_json::Value, Vec<u8>) {
    let dir = tmp();
    let counts = unpack_untrusted(dir.path(), tar, tar.len() as u64, 10_000).expect("unpack on the provider");
    assert!(counts.files > 0);
    let snap = select_received(dir.path(), 1 << 30, false).expect("select as sent");
    let (_container, out) = run_job(&snap, job);
    let changes = diff(&snap, &out[..], &big()).expect("provider diff");
    apply(&changes, &snap, dir.path()).expect("provider apply");
    let doc = serde_json::to_value(&changes).unwrap();
    let delta = pack_delta(dir.path(), &doc, 1 << 30).expect("pack_delta");
    (dir, doc, delta)
}

fn listing(cs: &ChangeSet) -> Vec<(String, ChangeKind)> {
    cs.files.iter().map(|f| (f.path.clone(), f.change)).collect()
}

#[test]
fn a_delta_rebuilds_the_jobs_tree_and_the_requester_makes_its_own_change_set() {
    let orig = requester_dir();
    let before = copy_tree(orig.path());
    let s = select(orig.path(), &rules()).unwrap();
    let mut tar = Vec::new();
    s.write_tar(&mut tar).unwrap();

    let (provider_dir, doc, delta) = provider(&tar, edit);
    // The delta carries new bytes only: not the unchanged README, not
    // what the rules leave out.
    let text = String::from_utf8_lossy(&delta);
    assert!(text.starts_with("CMMDELTA"));
    assert!(text.contains("rewritten") && !text.contains("# Title") && !text.contains("from the job"));

    let into = tmp();
    let mine = rebuild(&s, &delta, into.path(), &big()).expect("rebuild");

    // What a local job doing the same would have given.
    let (_c, out) = run_job(&s, edit);
    let local = diff(&s, &out[..], &big()).unwrap();
    assert_eq!(listing(&mine), listing(&local));
    assert_eq!(mine.dirs_added, local.dirs_added);
    assert_eq!(mine.dirs_removed, local.dirs_removed);
    assert_eq!(mine.patch_text().unwrap(), local.patch_text().unwrap());
    assert_eq!(mine.base, s.id());
    let kinds: BTreeMap<String, ChangeKind> = listing(&mine).into_iter().collect();
    for (p, k) in [
        ("src/lib.rs", ChangeKind::Modified),
        ("src/new/deep/mod.rs", ChangeKind::Added),
        ("src/gone.rs", ChangeKind::Deleted),
        ("run.sh", ChangeKind::ModeChanged),
        ("data.txt", ChangeKind::Modified),
        ("readme", ChangeKind::Modified),
        ("to-link", ChangeKind::TypeChanged),
        ("was-dir", ChangeKind::Added),
        ("was-dir/a.txt", ChangeKind::Deleted),
        ("was-file", ChangeKind::Deleted),
        ("was-file/inner.txt", ChangeKind::Added),
        ("old/x.txt", ChangeKind::Deleted),
        ("old/sub/y.bin", ChangeKind::Deleted),
    ] {
        assert_eq!(kinds.get(p), Some(&k), "{p} in {kinds:?}");
    }
    assert_eq!(kinds.len(), 13, "{kinds:?}");
    for d in ["empty-new", "src/new", "src/new/deep", "was-file"] {
        assert!(mine.dirs_added.contains(&d.to_string()), "{d} in {:?}", mine.dirs_added);
    }
    for d in ["old", "old/sub", "was-dir"] {
        assert!(
            mine.dirs_removed.contains(&d.to_string()),
            "{d} in {:?}",
            mine.dirs_removed
        );
    }
    // The provider's record says the same, but it is not what we used.
    assert_eq!(doc["files"].as_array().unwrap().len(), 13);

    // `into` is the job's tree, for an acceptance test.
    let rebuilt = tree(into.path());
    assert_eq!(rebuilt["src/lib.rs"].1, b"rewritten\n");
    assert_eq!(rebuilt["readme"], ('l', b"src/lib.rs".to_vec(), false));
    assert!(rebuilt["run.sh"].2, "the execute bit came back");
    assert!(!rebuilt.contains_key("target") && !rebuilt.contains_key(".env"));

    // Applied to DIR it gives what applying the local change set gives.
    let expected = copy_tree(before.path());
    apply(&local, &s, expected.path()).unwrap();
    apply(&mine, &s, orig.path()).expect("apply the rebuilt change set");
    assert_eq!(tree(orig.path()), tree(expected.path()));
    assert_eq!(tree(orig.path())[".env"].1, b"SECRET=1\n", "an ignored file stays home");
    for d in [
        orig.path(),
        expected.path(),
        before.path(),
        into.path(),
        provider_dir.path(),
    ] {
        writable(d);
    }
}

#[test]
fn a_job_that_changes_nothing_sends_an_empty_delta() {
    let orig = requester_dir();
    let s = select(orig.path(), &rules()).unwrap();
    let mut tar = Vec::new();
    s.write_tar(&mut tar).unwrap();
    let (p, _doc, delta) = provider(&tar, |_| {});
    let into = tmp();
    let cs = rebuild(&s, &delta, into.path(), &big()).unwrap();
    assert!(cs.is_empty(), "{}", cs.summary);
    for d in [orig.path(), p.path(), into.path()] {
        writable(d);
    }
}

#[test]
fn the_provider_selects_exactly_what_was_sent() {
    // The provider's global excludes would hide `*.log` from the job.
    let home = tmp();
    put(home.path(), "ignore", "*.log\n");
    let orig = tmp();
    put(orig.path(), "app.log", "sent\n");
    put(orig.path(), ".gitignore", "secret\n");
    put(orig.path(), "secret", "stays\n");
    let s = select(orig.path(), &rules()).unwrap();
    let mut tar = Vec::new();
    s.write_tar(&mut tar).unwrap();
    let dir = tmp();
    unpack_untrusted(dir.path(), &tar[..], 1 << 20, 100).unwrap();
    let as_host = select(
        dir.path(),
        &Rules {
            global_excludes: Some(home.path().join("ignore")),
            ..Rules::new(1 << 20)
        },
    )
    .unwrap();
    assert!(as_host.get("app.log").is_none(), "the host's rules would drop it");
    let exact = select_received(dir.path(), 1 << 20, false).unwrap();
    let paths: Vec<&str> = exact.entries().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, [".gitignore", "app.log"]);
    assert_eq!(Rules::exact(5, true).global_excludes, None);

    // Below a git work tree the parents' rules would apply: refused.
    let repo = tmp();
    fs::create_dir(repo.path().join(".git")).unwrap();
    put(repo.path(), ".gitignore", "*.log\n");
    let inside = repo.path().join("task");
    fs::create_dir(&inside).unwrap();
    unpack_untrusted(&inside, &tar[..], 1 << 20, 100).unwrap();
    let err = select_received(&inside, 1 << 20, false).unwrap_err();
    assert!(matches!(err, WorkspaceError::InsideWorkTree { .. }), "{err}");
    let top = repo.path().canonicalize().unwrap();
    assert!(err.to_string().contains(&top.display().to_string()), "{err}");
    assert!(err.hint().unwrap().contains("outside any git repository"));
}

#[test]
fn pack_delta_refuses_a_record_that_does_not_match_the_directory() {
    let d = tmp();
    put(d.path(), "a.txt", "a\n");
    link(d.path(), "a.txt", "l");
    let file = |path: &str, change: &str, kind: &str| json!({"files": [{"path": path, "change": change, "kind": kind, "new_mode": "100644"}]});
    let cases = [
        (json!({"nope": 1}), "not a `changes` document"),
        (file("../a.txt", "modified", "file"), "`..`"),
        (file("/etc/passwd", "added", "file"), "absolute"),
        (file("l", "modified", "file"), "not the file"),
        (file("a.txt", "modified", "symlink"), "not the symbolic link"),
        (file("missing", "added", "file"), "`missing` is not there"),
        (file("a.txt", "renamed", "file"), "unknown change"),
        (
            json!({"files": [{"path": "a.txt", "change": "mode_changed", "kind": "file", "new_mode": "100755"}]}),
            "not the file",
        ),
        (json!({"files": [], "dirs_added": ["a.txt"]}), "not the directory"),
        (file("l/x", "added", "file"), "`l/x` is below a symbolic link or a file"),
    ];
    for (doc, want) in cases {
        let err = pack_delta(d.path(), &doc, 1 << 20).unwrap_err();
        assert!(matches!(err, WorkspaceError::ChangesUnusable { .. }), "{err}");
        assert!(err.to_string().contains(want), "{want}: {err}");
        assert_eq!(err.exit(), Exit::Failed);
    }
    put(d.path(), "big", vec![b'x'; 50_000]);
    let err = pack_delta(d.path(), &file("big", "added", "file"), 20_000).unwrap_err();
    assert!(matches!(err, WorkspaceError::DeltaTooBig { limit: 20_000 }), "{err}");
    assert!(pack_delta(d.path(), &file("big", "added", "file"), 60_000).is_ok());
}

// ---------------------------------------------------------------------------
// Hostile deltas

/// A delta with this manifest (its tar length and hash filled in) and tar.
fn craft(mut manifest: serde_json::Value, tar: &[u8]) -> Vec<u8> {
    let m = manifest.as_object_mut().unwrap();
    for key in ["deleted", "dirs_added", "dirs_removed"] {
        m.entry(key).or_insert(json!([]));
    }
    m.entry("exec").or_insert(json!({}));
    m.entry("v").or_insert(json!(1));
    m.insert("tar_bytes".into(), json!(tar.len()));
    m.insert("tar_sha256".into(), json!(hex::encode(Sha256::digest(tar))));
    let json = serde_json::to_vec(&manifest).unwrap();
    let mut out = b"CMMDELTA".to_vec();
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(tar);
    out
}

fn file_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, p, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn link_tar(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, target) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, p, target).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn hostile_deltas_are_refused_and_nothing_is_written_outside() {
    let orig = tmp();
    put(orig.path(), "a.txt", "a\n");
    put(orig.path(), "sub/b.txt", "b\n");
    link(orig.path(), "sub", "to-sub");
    // `hop` stays inside only while `sub/up` points at `sub` itself.
    link(orig.path(), ".", "sub/up");
    link(orig.path(), "sub/up/..", "hop");
    let s = select(orig.path(), &rules()).unwrap();
    // `victim` stands for everything outside `into`: it must stay empty.
    let base = tmp();
    let victim = base.path().join("victim");
    fs::create_dir(&victim).unwrap();

    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"hello, world".to_vec(), "not a delta"),
        ("empty", Vec::new(), "not a delta"),
        (
            "manifest cut",
            b"CMMDELTA\0\0\0\x40{\"v\":1".to_vec(),
            "manifest is cut short",
        ),
        (
            "manifest garbage",
            {
                let mut d = b"CMMDELTA\0\0\0\x03".to_vec();
                d.extend_from_slice(b"{x}");
                d
            },
            "manifest is not valid",
        ),
        ("unknown field", craft(json!({"run": "rm -rf /"}), &[]), "unknown field"),
        ("version", craft(json!({"v": 2}), &[]), "version 2"),
        (
            "tar `..`",
            craft(
                json!({}),
                &raw_tar(&[(b"../victim/x", tar::EntryType::Regular, b"x", b"")]),
            ),
            "`..`",
        ),
        (
            "tar absolute",
            craft(json!({}), &raw_tar(&[(b"/tmp/x", tar::EntryType::Regular, b"x", b"")])),
            "absolute",
        ),
        (
            "through a link",
            craft(json!({}), &file_tar(&[("to-sub/evil", b"x")])),
            "below a symbolic link",
        ),
        (
            "through its own link",
            craft(json!({}), &{
                let mut t = link_tar(&[("esc", "../victim")]);
                t.truncate(t.len() - 1024);
                t.extend(file_tar(&[("esc/x", b"x")]));
                t
            }),
            "below a symbolic link",
        ),
        (
            "link out",
            craft(json!({}), &link_tar(&[("out", "../victim")])),
            "leads outside",
        ),
        (
            "absolute link",
            craft(json!({}), &link_tar(&[("out", "/etc/passwd")])),
            "leads outside",
        ),
        (
            "a link that sends another out",
            // `sub/up -> ..` alone stays inside, but takes `hop` out.
            craft(json!({}), &link_tar(&[("sub/up", "..")])),
            "leads outside",
        ),
        (
            "hard link",
            craft(json!({}), &raw_tar(&[(b"h", tar::EntryType::Link, b"", b"a.txt")])),
            "Link entry",
        ),
        (
            "fifo",
            craft(json!({}), &raw_tar(&[(b"f", tar::EntryType::Fifo, b"", b"")])),
            "Fifo entry",
        ),
        (
            "twice",
            craft(json!({}), &file_tar(&[("n.txt", b"1"), ("n.txt", b"2")])),
            "twice",
        ),
        (
            "over a directory",
            craft(json!({}), &file_tar(&[("sub", b"x")])),
            "is a directory",
        ),
        (
            "no parent",
            craft(json!({}), &file_tar(&[("nowhere/x", b"x")])),
            "neither in the workspace",
        ),
        ("delete `..`", craft(json!({"deleted": ["../victim"]}), &[]), "`..`"),
        (
            "delete absolute",
            craft(json!({"deleted": ["/etc/passwd"]}), &[]),
            "absolute",
        ),
        (
            "delete missing",
            craft(json!({"deleted": ["nope"]}), &[]),
            "not in the workspace",
        ),
        (
            "delete through a link",
            craft(json!({"deleted": ["to-sub/b.txt"]}), &[]),
            "below a symbolic link",
        ),
        (
            "delete a directory",
            craft(json!({"deleted": ["sub"]}), &[]),
            "is a directory",
        ),
        (
            "remove a full directory",
            craft(json!({"dirs_removed": ["sub"]}), &[]),
            "does not delete all",
        ),
        (
            "remove the root",
            craft(json!({"dirs_removed": ["."]}), &[]),
            "the workspace itself",
        ),
        (
            "add outside",
            craft(json!({"dirs_added": ["../victim/d"]}), &[]),
            "`..`",
        ),
        (
            "add what is there",
            craft(json!({"dirs_added": ["sub"]}), &[]),
            "already there",
        ),
        (
            "exec of a link",
            craft(json!({"exec": {"to-sub": true}}), &[]),
            "not a file",
        ),
    ];
    // Cut short or added to: the tar no longer matches its manifest.
    let whole = craft(json!({}), &file_tar(&[("n1", b"1"), ("n2", b"2")]));
    cases.push((
        "cut at an entry",
        whole[..whole.len() - 1024 - 512 - 512].to_vec(),
        "cut short",
    ));
    cases.push(("cut in a block", whole[..whole.len() - 700].to_vec(), "cut short"));
    let mut longer = whole.clone();
    longer.extend_from_slice(&[0u8; 512]);
    cases.push(("added to", longer, "added to"));
    let mut flipped = whole.clone();
    let at = flipped.len() - 1024 - 512;
    flipped[at] ^= 1;
    cases.push(("changed", flipped, "SHA-256"));

    for (name, delta, want) in cases {
        let into = base.path().join("into");
        fs::create_dir(&into).unwrap();
        let err = rebuild(&s, &delta, &into, &big()).unwrap_err();
        assert!(
            matches!(
                err,
                WorkspaceError::Refused {
                    input: Untrusted::Delta,
                    ..
                }
            ),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(want), "{name}: want {want:?} in: {err}");
        assert!(err.to_string().starts_with("the provider's delta is refused"), "{err}");
        assert_eq!(err.exit(), Exit::Failed);
        assert!(err.hint().unwrap().contains("nothing was applied"));
        assert_eq!(fs::read_dir(&victim).unwrap().count(), 0, "{name} wrote outside");
        let mut names: Vec<_> = fs::read_dir(base.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["into", "victim"], "{name}");
        writable(&into);
        fs::remove_dir_all(&into).unwrap();
    }
    assert_eq!(tree(orig.path()).len(), 6, "DIR itself is never touched");
}

#[test]
fn a_delta_over_the_bound_is_refused_before_it_is_read() {
    let orig = tmp();
    put(orig.path(), "a.txt", "a\n");
    let s = select(orig.path(), &rules()).unwrap();
    let delta = craft(json!({}), &file_tar(&[("big", &[b'x'; 10_000])]));
    let into = tmp();
    let err = rebuild(&s, &delta, into.path(), &DiffRules::new(5_000)).unwrap_err();
    assert!(
        matches!(
            err,
            WorkspaceError::OverBound {
                input: Untrusted::Delta,
                what: Bound::Bytes,
                limit: 5_000
            }
        ),
        "{err}"
    );
    assert_eq!(fs::read_dir(into.path()).unwrap().count(), 0);
    // Within the bound it is taken.
    let cs = rebuild(&s, &delta, into.path(), &DiffRules::new(1 << 20)).unwrap();
    assert_eq!(listing(&cs), [("big".to_string(), ChangeKind::Added)]);
}

#[test]
fn rebuild_needs_an_empty_directory() {
    let orig = tmp();
    put(orig.path(), "a.txt", "a\n");
    let s = select(orig.path(), &rules()).unwrap();
    let into = tmp();
    put(into.path(), "left-over", "x");
    let err = rebuild(&s, &craft(json!({}), &[]), into.path(), &big()).unwrap_err();
    assert!(matches!(err, WorkspaceError::InTheWay { .. }), "{err}");
    assert!(err.to_string().contains("left-over"), "{err}");
}

#[test]
fn a_delta_writes_nothing_the_requester_left_out() {
    let orig = tmp();
    put(orig.path(), ".gitignore", "target/\n");
    put(orig.path(), "a.txt", "a\n");
    let s = select(orig.path(), &rules()).unwrap();
    // A `.git` the requester did not send could make `git` in the
    // rebuilt tree run the provider's hooks or `core.fsmonitor`.
    let tar = file_tar(&[
        (".git/config", b"[core]\n\tfsmonitor = touch /tmp/pwned\n"),
        ("target/x", b"built"),
        ("b.txt", b"b\n"),
    ]);
    let delta = craft(json!({"dirs_added": [".git", "target"]}), &tar);
    let into = tmp();
    let cs = rebuild(&s, &delta, into.path(), &big()).unwrap();
    assert_eq!(listing(&cs), [("b.txt".to_string(), ChangeKind::Added)]);
    assert!(!into.path().join(".git").exists() && !into.path().join("target").exists());
}
