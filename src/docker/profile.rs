//! The security profile: `security-config.json`, embedded in this binary
//! and parsed once, with its `container` section (the job container's
//! hardening) and its `egress` section (what the job's proxy lets out).
//!
//! This module owns the shape of those two sections and the checks that
//! make a profile acceptable. It must not build container requests (that
//! is `hardening`'s) nor run the proxy (`egress`'s), and it imports neither:
//! both import it. The `crypto` section belongs to `crate::crypto`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::Value;

use super::DockerError;

/// The embedded security configuration.
pub const SECURITY_CONFIG: &str = include_str!("../../security-config.json");

/// The `container` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Profile {
    #[serde(default)]
    pub note: Option<String>,
    /// Label every job container of ours carries (value `true`).
    pub label: String,
    /// Label on images we build (value `true`). Separate from `label`
    /// because containers inherit image labels: a container someone else
    /// starts from our image is not ours to clean up.
    pub image_label: String,
    /// Label holding the job id.
    pub job_label: String,
    /// Label holding the id of the install that started the job (its audit
    /// log's id): only that install's `opt-out` and `clean` touch it.
    pub install_label: String,
    pub user: String,
    pub home: String,
    pub read_only_rootfs: bool,
    /// Mount point -> tmpfs options (size-limited, noexec, nosuid).
    pub tmpfs: HashMap<String, String>,
    /// Where a job's workspace copy lives.
    pub workspace: WorkspaceMount,
    pub pids_limit: i64,
    pub nano_cpus: i64,
    pub cap_drop: Vec<String>,
    pub security_opt: Vec<String>,
    #[serde(default)]
    pub forbidden_networks: Vec<String>,
}

/// The `workspace` part of the profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkspaceMount {
    #[serde(default)]
    pub note: Option<String>,
    pub mount: String,
    /// tmpfs options without the size (that is `docker.workspaceLimit`).
    pub tmpfs: String,
}

impl WorkspaceMount {
    /// The tmpfs options for a workspace of `size` bytes. Its inodes are
    /// capped too (one per KiB of size, at least 16,384), so the archive it
    /// packs into (a header per file) stays bounded as well.
    pub fn options(&self, size: u64) -> String {
        format!("{},size={size},nr_inodes={}", self.tmpfs, Self::inodes(size))
    }

    pub fn inodes(size: u64) -> u64 {
        (size / 1024).max(16_384)
    }

    /// The most bytes the archive of a workspace of `size` bytes can take:
    /// the content, a header and padding per inode, and the end marker.
    pub fn archive_bound(size: u64) -> u64 {
        size.saturating_add(Self::inodes(size).saturating_mul(1024))
            .saturating_add(1 << 20)
    }
}

/// The `egress` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressProfile {
    #[serde(default)]
    pub note: Option<String>,
    /// Where the relay listens inside the job container (its loopback):
    /// the container's `HTTPS_PROXY`.
    pub relay_listen: SocketAddr,
    /// `host:port` targets every job may reach.
    pub allow: Vec<String>,
    /// Extra targets by credential kind (`subscription`, `api-key`).
    #[serde(default)]
    pub allow_by_credential: HashMap<String, Vec<String>>,
    pub max_header_bytes: usize,
    pub header_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub max_connections: usize,
}

impl EgressProfile {
    /// The allowlist for a credential kind, lower-cased.
    pub fn allowlist(&self, credential_kind: &str) -> Vec<String> {
        let mut all: Vec<String> = self
            .allow
            .iter()
            .chain(self.allow_by_credential.get(credential_kind).into_iter().flatten())
            .map(|t| t.to_ascii_lowercase())
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// Both sections of the embedded file, each parsed on its own, so a fault
/// in one is reported by whoever asks for that one.
struct Sections {
    container: Result<Profile, String>,
    egress: Result<EgressProfile, String>,
}

fn sections() -> &'static Sections {
    static SECTIONS: OnceLock<Sections> = OnceLock::new();
    SECTIONS.get_or_init(|| match serde_json::from_str::<Value>(SECURITY_CONFIG) {
        Ok(v) => Sections {
            container: container_section(&v),
            egress: egress_section(&v),
        },
        Err(e) => Sections {
            container: Err(e.to_string()),
            egress: Err(e.to_string()),
        },
    })
}

/// The `container` section, parsed once.
pub fn container() -> Result<&'static Profile, DockerError> {
    sections()
        .container
        .as_ref()
        .map_err(|e| DockerError::Profile(e.clone()))
}

/// The `egress` section, parsed once.
pub fn egress() -> Result<&'static EgressProfile, DockerError> {
    sections().egress.as_ref().map_err(|e| DockerError::Profile(e.clone()))
}

/// The `container` section of a whole security configuration `text`.
pub fn parse_container(text: &str) -> Result<Profile, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    container_section(&v)
}

/// The `egress` section of a whole security configuration `text`.
pub fn parse_egress(text: &str) -> Result<EgressProfile, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    egress_section(&v)
}

fn container_section(v: &Value) -> Result<Profile, String> {
    let section = v.get("container").cloned().ok_or("no `container` section")?;
    let p: Profile = serde_json::from_value(section).map_err(|e| format!("container: {e}"))?;
    if !p.tmpfs.contains_key("/tmp") || !p.tmpfs.contains_key(&p.home) {
        return Err("container.tmpfs must mount /tmp and the home directory".into());
    }
    for (mount, opts) in &p.tmpfs {
        let words: Vec<&str> = opts.split(',').collect();
        if !words.iter().any(|w| w.starts_with("size=")) || !words.contains(&"noexec") || !words.contains(&"nosuid") {
            return Err(format!(
                "container.tmpfs {mount} must be size-limited, noexec and nosuid"
            ));
        }
    }
    let ws: Vec<&str> = p.workspace.tmpfs.split(',').collect();
    if !ws.contains(&"nosuid") || !ws.contains(&"nodev") || ws.iter().any(|w| w.starts_with("size=")) {
        return Err(
            "container.workspace.tmpfs must be nosuid and nodev, and leave the size to docker.workspaceLimit".into(),
        );
    }
    if !p.workspace.mount.starts_with('/') || p.tmpfs.contains_key(&p.workspace.mount) {
        return Err("container.workspace.mount must be an absolute path of its own".into());
    }
    Ok(p)
}

fn egress_section(v: &Value) -> Result<EgressProfile, String> {
    let section = v.get("egress").cloned().ok_or("no `egress` section")?;
    let p: EgressProfile = serde_json::from_value(section).map_err(|e| format!("egress: {e}"))?;
    for t in p.allow.iter().chain(p.allow_by_credential.values().flatten()) {
        if split_target(t).is_none() {
            return Err(format!("egress: `{t}` is not host:port"));
        }
    }
    if p.max_header_bytes < 64 || p.max_connections == 0 {
        return Err("egress: maxHeaderBytes and maxConnections must be set".into());
    }
    if !p.relay_listen.ip().is_loopback() || p.relay_listen.port() == 0 {
        return Err("egress: relayListen must be a loopback address with a port".into());
    }
    Ok(p)
}

/// `host:port` with a host of letters, digits, dots and dashes (or an IP
/// literal, optionally in brackets) and a port in 1..=65535.
pub(crate) fn split_target(t: &str) -> Option<(&str, u16)> {
    let (host, port) = t.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    (name_ok || host.parse::<IpAddr>().is_ok()).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_without_size_limited_tmpfs_is_rejected() {
        let text = SECURITY_CONFIG.replace("rw,noexec,nosuid,nodev,size=64m", "rw,nosuid");
        assert!(parse_container(&text).is_err());
        assert!(parse_egress(&text).is_ok(), "the egress section is read on its own");
    }

    #[test]
    fn embedded_profile_parses_and_subscriptions_add_the_platform_host() {
        assert!(container().is_ok());
        let p = egress().unwrap();
        assert_eq!(p.allowlist("api-key"), vec!["api.anthropic.com:443".to_string()]);
        assert_eq!(
            p.allowlist("subscription"),
            vec![
                "api.anthropic.com:443".to_string(),
                "platform.claude.com:443".to_string()
            ]
        );
    }

    #[test]
    fn targets_are_host_and_port() {
        assert!(split_target("a.b:0").is_none());
        assert!(split_target("a b:443").is_none());
        assert!(split_target("[::1]:443").is_some());
        assert!(parse_egress(&SECURITY_CONFIG.replace("api.anthropic.com:443", "api.anthropic.com")).is_err());
    }
}
