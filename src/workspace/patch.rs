//! The patch, written the way `git diff --binary` writes it, so `git apply`
//! takes it as it is: `diff --git` headers, mode lines, full blob ids on
//! `index` lines, unified hunks with three lines of context and
//! `\ No newline at end of file`, and binary files as `GIT binary patch`
//! literals (zlib stored blocks in git's base85), or, when a file is too big
//! to carry, the `Binary files ... differ` line git prints without
//! `--binary`.
//!
//! It formats what `diff` hands it; it must not read files or decide what
//! changed.

use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};
use similar::{capture_diff_slices_deadline, group_diff_ops, Algorithm, DiffTag};

/// How long one file's line diff may search for the smallest diff before
/// settling for a correct, larger one.
const DIFF_DEADLINE: Duration = Duration::from_secs(2);

/// The id git gives a blob with these bytes (SHA-1 of `blob <len>\0` + bytes).
pub(crate) fn blob_id(data: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", data.len()));
    h.update(data);
    hex::encode(h.finalize())
}

const NULL_ID: &str = "0000000000000000000000000000000000000000";

/// Git's heuristic: a NUL in the first 8000 bytes makes a file binary.
pub(crate) fn looks_binary(data: &[u8]) -> bool {
    data[..data.len().min(8000)].contains(&0)
}

/// One side of a change, as the patch needs it.
pub(crate) struct Side<'a> {
    /// 100644, 100755 or 120000.
    pub mode: u32,
    /// A file's bytes, or a link's target.
    pub data: &'a [u8],
}

/// What one file's section says.
pub(crate) struct Section {
    pub text: Vec<u8>,
    pub lines_added: u64,
    pub lines_removed: u64,
    /// False when a binary file was too big to carry its bytes.
    pub complete: bool,
}

/// The section for `path` going from `old` to `new` (`None`: absent). A
/// change of kind (file to link) is two sections: call this twice.
pub(crate) fn section(path: &str, old: Option<Side>, new: Option<Side>, binary: bool, max_binary: u64) -> Section {
    let a = quote(&format!("a/{path}"));
    let b = quote(&format!("b/{path}"));
    let mut out = Vec::new();
    let mut s = Section {
        text: Vec::new(),
        lines_added: 0,
        lines_removed: 0,
        complete: true,
    };
    out.extend_from_slice(format!("diff --git {a} {b}\n").as_bytes());
    let (old_id, new_id) = (
        old.as_ref().map(|o| blob_id(o.data)),
        new.as_ref().map(|n| blob_id(n.data)),
    );
    match (&old, &new) {
        (None, Some(n)) => out.extend_from_slice(format!("new file mode {:o}\n", n.mode).as_bytes()),
        (Some(o), None) => out.extend_from_slice(format!("deleted file mode {:o}\n", o.mode).as_bytes()),
        (Some(o), Some(n)) if o.mode != n.mode => {
            out.extend_from_slice(format!("old mode {:o}\nnew mode {:o}\n", o.mode, n.mode).as_bytes())
        }
        _ => {}
    }
    let same_content = old_id.is_some() && old_id == new_id;
    if !same_content {
        let o = old_id.as_deref().unwrap_or(NULL_ID);
        let n = new_id.as_deref().unwrap_or(NULL_ID);
        match (&old, &new) {
            (Some(os), Some(ns)) if os.mode == ns.mode => {
                out.extend_from_slice(format!("index {o}..{n} {:o}\n", os.mode).as_bytes())
            }
            _ => out.extend_from_slice(format!("index {o}..{n}\n").as_bytes()),
        }
        let old_data = old.as_ref().map(|o| o.data).unwrap_or_default();
        let new_data = new.as_ref().map(|n| n.data).unwrap_or_default();
        if binary {
            let (from, to) = (
                if old.is_some() { a.as_str() } else { "/dev/null" },
                if new.is_some() { b.as_str() } else { "/dev/null" },
            );
            if new.is_none() {
                // A deletion needs no bytes: the full index line says what goes.
                out.extend_from_slice(format!("Binary files {from} and {to} differ\n").as_bytes());
            } else if new_data.len() as u64 <= max_binary {
                binary_literal(&mut out, new_data);
            } else {
                out.extend_from_slice(format!("Binary files {from} and {to} differ\n").as_bytes());
                s.complete = false;
            }
        } else if !(old_data.is_empty() && new_data.is_empty()) {
            out.extend_from_slice(
                format!(
                    "--- {}\n+++ {}\n",
                    if old.is_some() { a.as_str() } else { "/dev/null" },
                    if new.is_some() { b.as_str() } else { "/dev/null" },
                )
                .as_bytes(),
            );
            let (added, removed) = hunks(&mut out, old_data, new_data);
            s.lines_added = added;
            s.lines_removed = removed;
        }
    }
    s.text = out;
    s
}

/// Lines of `data`, each with its `\n` (the last may have none).
fn lines(data: &[u8]) -> Vec<&[u8]> {
    data.split_inclusive(|&b| b == b'\n').collect()
}

/// Unified hunks from `old` to `new`; returns (lines added, lines removed).
fn hunks(out: &mut Vec<u8>, old: &[u8], new: &[u8]) -> (u64, u64) {
    let (old, new) = (lines(old), lines(new));
    let ops = capture_diff_slices_deadline(Algorithm::Myers, &old, &new, Some(Instant::now() + DIFF_DEADLINE));
    let (mut added, mut removed) = (0u64, 0u64);
    for group in group_diff_ops(ops, 3) {
        let (Some(first), Some(last)) = (group.first(), group.last()) else {
            continue;
        };
        let (os, oe) = (first.old_range().start, last.old_range().end);
        let (ns, ne) = (first.new_range().start, last.new_range().end);
        out.extend_from_slice(format!("@@ -{} +{} @@\n", range(os, oe - os), range(ns, ne - ns)).as_bytes());
        for op in &group {
            let (tag, o, n) = op.as_tag_tuple();
            match tag {
                DiffTag::Equal => o.for_each(|i| line(out, b' ', old[i])),
                DiffTag::Delete => o.for_each(|i| line(out, b'-', old[i])),
                DiffTag::Insert => n.for_each(|i| line(out, b'+', new[i])),
                DiffTag::Replace => {
                    o.for_each(|i| line(out, b'-', old[i]));
                    n.for_each(|i| line(out, b'+', new[i]));
                }
            }
            match tag {
                DiffTag::Delete => removed += op.old_range().len() as u64,
                DiffTag::Insert => added += op.new_range().len() as u64,
                DiffTag::Replace => {
                    removed += op.old_range().len() as u64;
                    added += op.new_range().len() as u64;
                }
                DiffTag::Equal => {}
            }
        }
    }
    (added, removed)
}

/// A hunk range as git prints it: `start,len`, `start` alone when the
/// length is 1, and for an empty range the line *before* it.
fn range(start: usize, len: usize) -> String {
    match len {
        0 => format!("{start},0"),
        1 => format!("{}", start + 1),
        n => format!("{},{n}", start + 1),
    }
}

fn line(out: &mut Vec<u8>, prefix: u8, l: &[u8]) {
    out.push(prefix);
    out.extend_from_slice(l);
    if !l.ends_with(b"\n") {
        out.extend_from_slice(b"\n\\ No newline at end of file\n");
    }
}

/// `GIT binary patch` / `literal N` / base85 lines / blank line.
fn binary_literal(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(format!("GIT binary patch\nliteral {}\n", data.len()).as_bytes());
    let z = zlib_stored(data);
    for chunk in z.chunks(52) {
        let n = chunk.len() as u8;
        out.push(if n <= 26 { b'A' + n - 1 } else { b'a' + n - 27 });
        base85(out, chunk);
        out.push(b'\n');
    }
    out.push(b'\n');
}

/// A zlib stream of stored (uncompressed) blocks: what `git apply`
/// inflates, without a compressor of our own.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut z = Vec::with_capacity(data.len() + data.len() / 65535 * 5 + 11);
    z.extend_from_slice(&[0x78, 0x01]);
    let mut blocks = data.chunks(65535).peekable();
    if blocks.peek().is_none() {
        z.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = blocks.next() {
        let len = block.len() as u16;
        z.push(u8::from(blocks.peek().is_none()));
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    z
}

/// Git's base85: each 4 bytes (zero-padded) as 5 characters, most
/// significant first.
fn base85(out: &mut Vec<u8>, data: &[u8]) {
    const ALPHABET: &[u8; 85] =
        b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~";
    for group in data.chunks(4) {
        let mut word = [0u8; 4];
        word[..group.len()].copy_from_slice(group);
        let mut v = u32::from_be_bytes(word);
        let mut enc = [0u8; 5];
        for slot in enc.iter_mut().rev() {
            *slot = ALPHABET[(v % 85) as usize];
            v /= 85;
        }
        out.extend_from_slice(&enc);
    }
}

/// A path as git writes it in a patch: as it is, or in double quotes with C
/// escapes when it holds a quote, a backslash, a control character or a
/// byte outside ASCII (git's default `core.quotePath`).
pub(crate) fn quote(path: &str) -> String {
    let needs = path
        .bytes()
        .any(|b| !(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\');
    if !needs {
        return path.to_string();
    }
    let mut s = String::from("\"");
    for b in path.bytes() {
        match b {
            0x07 => s.push_str("\\a"),
            0x08 => s.push_str("\\b"),
            b'\t' => s.push_str("\\t"),
            b'\n' => s.push_str("\\n"),
            0x0b => s.push_str("\\v"),
            0x0c => s.push_str("\\f"),
            b'\r' => s.push_str("\\r"),
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            b if !(0x20..0x7f).contains(&b) => s.push_str(&format!("\\{b:03o}")),
            b => s.push(char::from(b)),
        }
    }
    s.push('"');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_ids_match_git() {
        // `git hash-object /dev/null` and `printf 'hello\n' | git hash-object --stdin`.
        assert_eq!(blob_id(b""), "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
        assert_eq!(blob_id(b"hello\n"), "ce013625030ba8dba906f756967f9e9ca394464a");
    }

    #[test]
    fn hunk_ranges_read_like_git() {
        assert_eq!(range(0, 0), "0,0");
        assert_eq!(range(4, 1), "5");
        assert_eq!(range(4, 3), "5,3");
    }

    #[test]
    fn a_missing_final_newline_is_marked() {
        let s = section(
            "f",
            Some(Side {
                mode: 0o100644,
                data: b"a\nb",
            }),
            Some(Side {
                mode: 0o100644,
                data: b"a\nb\n",
            }),
            false,
            0,
        );
        let text = String::from_utf8(s.text).unwrap();
        assert!(text.contains("-b\n\\ No newline at end of file\n+b\n"), "{text}");
        assert_eq!((s.lines_added, s.lines_removed), (1, 1));
    }

    #[test]
    fn odd_names_are_quoted_like_git() {
        assert_eq!(quote("a/plain name.txt"), "a/plain name.txt");
        assert_eq!(quote("a/tab\there"), "\"a/tab\\there\"");
        assert_eq!(quote("a/é"), "\"a/\\303\\251\"");
        assert_eq!(quote("a/q\"b"), "\"a/q\\\"b\"");
    }

    #[test]
    fn base85_and_stored_zlib_are_well_formed() {
        let mut out = Vec::new();
        base85(&mut out, &[0, 0, 0, 0]);
        assert_eq!(out, b"00000");
        let z = zlib_stored(b"");
        assert_eq!(z, [0x78, 0x01, 1, 0, 0, 0xff, 0xff, 0, 0, 0, 1]);
        let big = vec![7u8; 70_000];
        let z = zlib_stored(&big);
        assert_eq!(z.len(), 2 + 5 + 65535 + 5 + (70_000 - 65535) + 4);
    }
}
