//! Where everything lives (DESIGN.md section 4).
//!
//! `CMM_HOME` (when set) holds everything in one directory, which is what
//! tests and portable installs use. Otherwise the platform's config dir holds
//! `config.json` and the data dir holds the rest.

use std::io;
use std::path::{Path, PathBuf};

use crate::fsutil;

/// Resolved locations of every file the tool reads or writes.
#[derive(Debug, Clone)]
pub struct Paths {
    pub config_dir: PathBuf,
    pub data_dir: PathBuf,
}

impl Paths {
    /// Resolve from `CMM_HOME` or the platform directories. Creates nothing.
    pub fn resolve() -> io::Result<Paths> {
        if let Some(home) = std::env::var_os("CMM_HOME").filter(|h| !h.is_empty()) {
            let home = PathBuf::from(home);
            return Ok(Paths::in_one_dir(home));
        }
        let dirs = directories::ProjectDirs::from("", "", "claude-max-market").ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "cannot find a home directory; set CMM_HOME to a directory for claude-max-market's files",
            )
        })?;
        Ok(Paths {
            config_dir: dirs.config_dir().to_path_buf(),
            data_dir: dirs.data_dir().to_path_buf(),
        })
    }

    /// Everything under one directory.
    pub fn in_one_dir(home: PathBuf) -> Paths {
        Paths {
            config_dir: home.clone(),
            data_dir: home,
        }
    }

    /// Create the directories (0700) if missing.
    pub fn ensure(&self) -> io::Result<()> {
        fsutil::ensure_private_dir(&self.config_dir)?;
        fsutil::ensure_private_dir(&self.data_dir)
    }

    pub fn config_file(&self) -> PathBuf {
        self.config_dir.join("config.json")
    }
    pub fn config_lock(&self) -> PathBuf {
        self.config_dir.join(".config.lock")
    }
    pub fn audit_log(&self) -> PathBuf {
        self.data_dir.join("audit.jsonl")
    }
    pub fn audit_head(&self) -> PathBuf {
        self.data_dir.join("audit.head")
    }
    pub fn audit_lock(&self) -> PathBuf {
        self.data_dir.join(".audit.lock")
    }
    pub fn usage_file(&self) -> PathBuf {
        self.data_dir.join("usage.json")
    }
    pub fn usage_lock(&self) -> PathBuf {
        self.data_dir.join(".usage.lock")
    }
    pub fn keys_dir(&self) -> PathBuf {
        self.data_dir.join("keys")
    }
    pub fn jobs_dir(&self) -> PathBuf {
        self.data_dir.join("jobs")
    }
    pub fn market_db(&self) -> PathBuf {
        self.data_dir.join("market.db")
    }
    /// Prompts of posted tasks still waiting for a provider, each encrypted
    /// to this node's own key (`market/pending/<task_id>.cmme`).
    pub fn pending_dir(&self) -> PathBuf {
        self.data_dir.join("market").join("pending")
    }

    /// The files and directories whose permissions `health` and
    /// `compliance-check` inspect: (path, is_dir).
    pub fn private_entries(&self) -> Vec<(PathBuf, bool)> {
        let mut v = vec![(self.config_dir.clone(), true)];
        if self.data_dir != self.config_dir {
            v.push((self.data_dir.clone(), true));
        }
        for (p, d) in [
            (self.config_file(), false),
            (self.audit_log(), false),
            (self.audit_head(), false),
            (self.usage_file(), false),
            (self.keys_dir(), true),
            (self.jobs_dir(), true),
            (self.pending_dir(), true),
        ] {
            if exists(&p) {
                v.push((p, d));
            }
        }
        v
    }
}

fn exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}
