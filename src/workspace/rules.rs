//! The ignore rules of one workspace, as git applies them (see the module
//! doc of [`super`] for which files count), and where links lead.
//!
//! It answers questions about paths; it must not copy or write anything.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// A matcher whose root is DIR or above it.
#[derive(Debug, Clone)]
struct Outer {
    /// DIR relative to the matcher's root.
    prefix: PathBuf,
    rules: Gitignore,
}

/// Every ignore rule that applies to one workspace, compiled once.
#[derive(Debug, Clone, Default)]
pub(crate) struct IgnoreRules {
    /// `.gitignore` of DIR and of selected directories below it, by the
    /// directory's path relative to DIR (`""` is DIR).
    inside: BTreeMap<String, Gitignore>,
    /// In falling precedence: parents' `.gitignore` (innermost first), the
    /// repository's `info/exclude`, the global excludes.
    outside: Vec<Outer>,
}

impl IgnoreRules {
    /// The rules from outside DIR: its parents up to the work tree's top,
    /// `info/exclude`, and the global excludes file. `dir` is canonical.
    pub fn discover(dir: &Path, global: Option<&Path>) -> IgnoreRules {
        let mut outside = Vec::new();
        let top = dir.ancestors().find(|a| fs::symlink_metadata(a.join(".git")).is_ok());
        if let Some(top) = top {
            for parent in dir.ancestors().skip(1).take_while(|a| a.starts_with(top)) {
                if let Some(rules) = load(parent, &parent.join(".gitignore")) {
                    outside.push(Outer {
                        prefix: relative(dir, parent),
                        rules,
                    });
                }
            }
            if let Some(git_dir) = common_git_dir(top) {
                if let Some(rules) = load(top, &git_dir.join("info").join("exclude")) {
                    outside.push(Outer {
                        prefix: relative(dir, top),
                        rules,
                    });
                }
            }
        }
        if let Some(global) = global {
            let root = top.unwrap_or(dir);
            if let Some(rules) = load(root, global) {
                outside.push(Outer {
                    prefix: relative(dir, root),
                    rules,
                });
            }
        }
        IgnoreRules {
            inside: BTreeMap::new(),
            outside,
        }
    }

    /// Only the rules from outside DIR (for walking it again).
    pub fn outside_only(&self) -> IgnoreRules {
        IgnoreRules {
            inside: BTreeMap::new(),
            outside: self.outside.clone(),
        }
    }

    /// Add the `.gitignore` found in the directory `rel` (relative to DIR).
    pub fn add_gitignore(&mut self, rel: &str, abs_dir: &Path, content: &[u8]) {
        if let Some(rules) = compile(abs_dir, None, content) {
            self.inside.insert(rel.to_string(), rules);
        }
    }

    /// Whether the rules exclude `rel` itself, its parents assumed selected
    /// (the walk asks this, top down).
    pub fn excludes(&self, rel: &str, is_dir: bool) -> bool {
        let path = Path::new(rel);
        let mut dir = path.parent();
        while let Some(d) = dir {
            let key = d.to_str().unwrap_or_default();
            if let Some(rules) = self.inside.get(key) {
                let sub = path.strip_prefix(d).unwrap_or(path);
                let m = rules.matched(sub, is_dir);
                if m.is_ignore() {
                    return true;
                }
                if m.is_whitelist() {
                    return false;
                }
            }
            dir = d.parent();
        }
        for o in &self.outside {
            let m = o.rules.matched(o.prefix.join(path), is_dir);
            if m.is_ignore() {
                return true;
            }
            if m.is_whitelist() {
                return false;
            }
        }
        false
    }

    /// Whether `rel` or any directory above it is left out, and if so the
    /// topmost such path: the question for a path that only exists in an
    /// archive. `.git` at any depth is left out unless `include_git`, and
    /// then no rule applies inside it.
    pub fn excludes_path(&self, rel: &str, is_dir: bool, include_git: bool) -> Option<String> {
        let mut start = 0;
        loop {
            let end = rel[start..].find('/').map(|i| start + i);
            let prefix = &rel[..end.unwrap_or(rel.len())];
            let name = &prefix[start..];
            let prefix_is_dir = end.is_some() || is_dir;
            if name == ".git" {
                return (!include_git).then(|| prefix.to_string());
            }
            if self.excludes(prefix, prefix_is_dir) {
                return Some(prefix.to_string());
            }
            match end {
                Some(e) => start = e + 1,
                None => return None,
            }
        }
    }
}

fn relative(dir: &Path, root: &Path) -> PathBuf {
    dir.strip_prefix(root).map(Path::to_path_buf).unwrap_or_default()
}

/// Read an ignore file without following a link and compile it with `root`.
fn load(root: &Path, file: &Path) -> Option<Gitignore> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(file)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut content = Vec::new();
    f.read_to_end(&mut content).ok()?;
    compile(root, Some(file), &content)
}

fn compile(root: &Path, from: Option<&Path>, content: &[u8]) -> Option<Gitignore> {
    let mut b = GitignoreBuilder::new(root);
    // Git skips lines it cannot parse; so do we (`add_line` reports them).
    for line in String::from_utf8_lossy(content).lines() {
        let _ = b.add_line(from.map(Path::to_path_buf), line);
    }
    let rules = b.build().ok()?;
    (!rules.is_empty()).then_some(rules)
}

/// The directory holding `info/exclude` for the work tree at `top`: `.git`,
/// or for a linked worktree (`.git` is a file naming its git dir), that git
/// dir's common directory.
fn common_git_dir(top: &Path) -> Option<PathBuf> {
    let dot_git = top.join(".git");
    let meta = fs::symlink_metadata(&dot_git).ok()?;
    let git_dir = if meta.is_dir() {
        dot_git
    } else {
        let text = fs::read_to_string(&dot_git).ok()?;
        let named = text.trim().strip_prefix("gitdir:")?.trim();
        top.join(named)
    };
    match fs::read_to_string(git_dir.join("commondir")) {
        Ok(common) => Some(git_dir.join(common.trim())),
        Err(_) => Some(git_dir),
    }
}

/// Whether the link at `link` (a path relative to the root) with `target`
/// resolves inside the root, expanding the links `symlink_at` knows on the
/// way as the kernel would. A target that is absolute, or whose `..` climbs
/// above the root at any step, leaves it. A loop never resolves, so it
/// cannot lead anywhere.
pub(crate) fn link_stays_inside<'a>(link: &str, target: &str, symlink_at: impl Fn(&str) -> Option<&'a str>) -> bool {
    if target.starts_with('/') {
        return false;
    }
    let mut at: Vec<&str> = link.split('/').collect();
    at.pop();
    let mut pending: VecDeque<&str> = target.split('/').collect();
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        match c {
            "" | "." => {}
            ".." => {
                if at.pop().is_none() {
                    return false;
                }
            }
            name => {
                at.push(name);
                if let Some(next) = symlink_at(&at.join("/")) {
                    hops += 1;
                    if hops > 40 {
                        return true;
                    }
                    if next.starts_with('/') {
                        return false;
                    }
                    at.pop();
                    for part in next.split('/').rev() {
                        pending.push_front(part);
                    }
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(files: &[(&str, &str)]) -> IgnoreRules {
        let mut r = IgnoreRules::default();
        for (dir, text) in files {
            r.add_gitignore(dir, &Path::new("/w").join(dir), text.as_bytes());
        }
        r
    }

    #[test]
    fn deeper_files_override_and_last_line_wins() {
        let r = rules(&[("", "*.log\n!keep.log\nbuild/\n"), ("sub", "!*.log\n")]);
        assert!(r.excludes("a.log", false));
        assert!(!r.excludes("keep.log", false));
        assert!(!r.excludes("sub/b.log", false), "sub/.gitignore re-includes");
        assert!(r.excludes("build", true));
        assert!(!r.excludes("build", false), "`build/` names directories only");
    }

    #[test]
    fn nothing_below_an_excluded_directory_comes_back() {
        let r = rules(&[("", "target/\n!target/keep\n")]);
        assert_eq!(r.excludes_path("target/keep", false, false).as_deref(), Some("target"));
        assert_eq!(
            r.excludes_path("target/debug/x", false, false).as_deref(),
            Some("target")
        );
        assert_eq!(r.excludes_path("src/main.rs", false, false), None);
    }

    #[test]
    fn git_dirs_are_left_out_whole_unless_included() {
        let r = rules(&[("", "*.pack\n")]);
        assert_eq!(r.excludes_path(".git/HEAD", false, false).as_deref(), Some(".git"));
        assert_eq!(r.excludes_path("sub/.git", true, false).as_deref(), Some("sub/.git"));
        assert_eq!(
            r.excludes_path(".git/objects/x.pack", false, true),
            None,
            "no rule applies inside .git"
        );
        assert_eq!(r.excludes_path("x.pack", false, true).as_deref(), Some("x.pack"));
    }

    #[test]
    fn anchored_patterns_are_relative_to_their_file() {
        let r = rules(&[("", "/top.txt\n"), ("sub", "/local\n")]);
        assert!(r.excludes("top.txt", false));
        assert!(!r.excludes("sub/top.txt", false));
        assert!(r.excludes("sub/local", false));
        assert!(!r.excludes("local", false));
    }

    #[test]
    fn links_that_climb_out_are_caught_even_through_other_links() {
        let none = |_: &str| None;
        assert!(link_stays_inside("a/l", "../b", none));
        assert!(link_stays_inside("l", ".", none));
        assert!(!link_stays_inside("l", "..", none));
        assert!(!link_stays_inside("a/l", "../../x", none));
        assert!(!link_stays_inside("l", "/etc/passwd", none));
        assert!(!link_stays_inside("a/l", "../b/../../x", none));
        // `d/up -> ..` is fine on its own, but `x -> d/up/..` leaves the root.
        let tree = |p: &str| (p == "d/up").then_some("..");
        assert!(link_stays_inside("d/up", "..", tree));
        assert!(!link_stays_inside("x", "d/up/..", tree));
        // A loop resolves to nothing.
        let looped = |p: &str| match p {
            "a" => Some("b"),
            "b" => Some("a"),
            _ => None,
        };
        assert!(link_stays_inside("a", "b", looped));
    }
}
