//! The job container's create request, derived from the `container`
//! section of the security profile ([`super::profile`]): the one source for
//! what `execute` sends and what `compliance-check` compares against.
//!
//! It owns turning the profile and the user's settings into a request, and
//! naming every way a request differs from the profile. It must not parse
//! the profile itself, talk to the engine, or run the egress proxy.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, HostConfig};

use crate::config::Config;

use super::profile::EgressProfile;
use super::DockerError;

// The profile's types and its `container` section, under the names the
// rest of the crate knows them by here.
pub use super::profile::{container as profile, Profile, WorkspaceMount};

/// What the user's config decides for a job container.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    pub memory: i64,
    pub cpu_shares: i64,
    pub network: String,
    /// `HTTPS_PROXY` for the container when egress is restricted (the
    /// relay on its loopback); `None` means `docker.egress=open`.
    pub proxy: Option<String>,
    /// The relay's entrypoint and read-only mounts (filled in by `execute`
    /// once its proxy listens and the image's entrypoint is known).
    pub relay: Option<RelaySetup>,
    /// Bytes of the job's workspace tmpfs, for a job with a workspace.
    pub workspace: Option<u64>,
}

/// How the egress relay goes into a restricted job container.
#[derive(Debug, Clone, PartialEq)]
pub struct RelaySetup {
    pub entrypoint: Vec<String>,
    pub binds: Vec<String>,
}

/// The network mode of a restricted job container: no interface but
/// loopback.
pub const NO_NETWORK: &str = "none";

/// The sysctl that switches IPv6 off inside a restricted job container.
pub const DISABLE_IPV6: (&str, &str) = ("net.ipv6.conf.all.disable_ipv6", "1");

impl Resources {
    pub fn from_config(cfg: &Config, profile: &Profile) -> Result<Resources, DockerError> {
        let memory = cfg.settings().docker.memory as i64;
        let network = cfg.settings().docker.network.clone();
        if profile.forbidden_networks.contains(&network) || network.starts_with("container:") {
            return Err(DockerError::Refused(format!(
                "docker.network `{network}` would share the host's or another container's network, which job containers may not"
            )));
        }
        // Restricted egress: no network, and the relay on loopback as the
        // only proxy.
        let (network, proxy) = if super::egress::restricted(cfg) {
            let e = super::profile::egress()?;
            (NO_NETWORK.to_string(), Some(format!("http://{}", e.relay_listen)))
        } else {
            (network, None)
        };
        Ok(Resources {
            memory,
            cpu_shares: cfg.settings().docker.cpu_shares,
            network,
            proxy,
            relay: None,
            workspace: None,
        })
    }
}

/// The profile's tmpfs mounts, and a job's workspace.
fn tmpfs(p: &Profile, r: &Resources) -> HashMap<String, String> {
    let mut t = p.tmpfs.clone();
    if let Some(size) = r.workspace {
        t.insert(p.workspace.mount.clone(), p.workspace.options(size));
    }
    t
}

/// The host config every job container gets.
pub fn host_config(p: &Profile, r: &Resources) -> HostConfig {
    HostConfig {
        memory: Some(r.memory),
        // Equal to memory: no swap on top of the limit.
        memory_swap: Some(r.memory),
        cpu_shares: Some(r.cpu_shares),
        nano_cpus: Some(p.nano_cpus),
        pids_limit: Some(p.pids_limit),
        cap_drop: Some(p.cap_drop.clone()),
        cap_add: None,
        security_opt: Some(p.security_opt.clone()),
        readonly_rootfs: Some(p.read_only_rootfs),
        tmpfs: Some(tmpfs(p, r)),
        network_mode: Some(r.network.clone()),
        privileged: Some(false),
        // No host mounts but the relay's two read-only ones.
        binds: r.relay.as_ref().map(|x| x.binds.clone()),
        mounts: None,
        auto_remove: Some(false),
        sysctls: r
            .proxy
            .as_ref()
            .map(|_| HashMap::from([(DISABLE_IPV6.0.to_string(), DISABLE_IPV6.1.to_string())])),
        ..Default::default()
    }
}

/// What one job container runs, and whose it is.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    pub image: &'a str,
    pub model: &'a str,
    /// Arguments the entrypoint passes on to `claude` after the model
    /// (`--max-turns N`, `--permission-mode M`, ...).
    pub claude_args: &'a [String],
    pub job_id: &'a str,
    /// This install's id (the audit log's id).
    pub install_id: &'a str,
}

impl<'a> Launch<'a> {
    /// A launch with no extra arguments, for checks that look only at the
    /// request's shape.
    pub fn example(image: &'a str) -> Launch<'a> {
        Launch {
            image,
            model: "sonnet",
            claude_args: &[],
            job_id: "compliance-check",
            install_id: "compliance-check",
        }
    }
}

/// The full create request for one job. The credential is deliberately not
/// a parameter: it travels only over the attached stdin.
pub fn create_body(p: &Profile, r: &Resources, l: &Launch<'_>) -> ContainerCreateBody {
    let labels = HashMap::from([
        (p.label.clone(), "true".to_string()),
        (p.job_label.clone(), l.job_id.to_string()),
        (p.install_label.clone(), l.install_id.to_string()),
    ]);
    let mut env = vec![format!("HOME={}", p.home)];
    if let Some(proxy) = &r.proxy {
        // Claude Code (Node) reads either spelling; nothing else is routed.
        env.push(format!("HTTPS_PROXY={proxy}"));
        env.push(format!("https_proxy={proxy}"));
        // Telemetry, error reporting and update checks would only be
        // refused at the proxy; ask Claude Code not to try.
        env.push("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1".into());
    }
    ContainerCreateBody {
        image: Some(l.image.to_string()),
        user: Some(p.user.clone()),
        entrypoint: r.relay.as_ref().map(|x| x.entrypoint.clone()),
        cmd: Some(
            std::iter::once(l.model.to_string())
                .chain(l.claude_args.iter().cloned())
                .collect(),
        ),
        env: Some(env),
        working_dir: Some(if r.workspace.is_some() {
            p.workspace.mount.clone()
        } else {
            p.home.clone()
        }),
        labels: Some(labels),
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(true),
        // Closing our end of stdin closes the container's: the prompt ends.
        stdin_once: Some(true),
        tty: Some(false),
        host_config: Some(host_config(p, r)),
        ..Default::default()
    }
}

/// Compare a create request with the profile; every difference is named.
pub fn mismatches(p: &Profile, body: &ContainerCreateBody) -> Vec<String> {
    let mut bad = Vec::new();
    let Some(h) = &body.host_config else {
        return vec!["no host config".into()];
    };
    let mut want = |ok: bool, what: &str| {
        if !ok {
            bad.push(what.to_string());
        }
    };
    want(body.user.as_deref() == Some(p.user.as_str()), "user");
    want(!p.user.starts_with("0") && !p.user.starts_with("root"), "non-root user");
    want(
        h.readonly_rootfs == Some(p.read_only_rootfs) && p.read_only_rootfs,
        "read-only rootfs",
    );
    // The profile's tmpfs mounts exactly, and at most a workspace of the
    // profile's shape (size-limited, nosuid, nodev) beside them.
    want(
        h.tmpfs.as_ref().is_some_and(|t| {
            let workspace_ok = t.get(&p.workspace.mount).is_none_or(|o| {
                o.strip_prefix(p.workspace.tmpfs.as_str())
                    .and_then(|rest| rest.strip_prefix(",size="))
                    .and_then(|rest| rest.split_once(",nr_inodes="))
                    .is_some_and(|(n, i)| {
                        n.parse::<u64>().is_ok_and(|n| n > 0) && i.parse::<u64>().is_ok_and(|i| i > 0)
                    })
            });
            let others: HashMap<String, String> = t
                .iter()
                .filter(|(k, _)| **k != p.workspace.mount)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            workspace_ok && others == p.tmpfs
        }),
        "tmpfs mounts",
    );
    want(h.memory.is_some() && h.memory == h.memory_swap, "memory = memory-swap");
    want(h.cpu_shares.is_some(), "cpu shares");
    want(h.nano_cpus == Some(p.nano_cpus), "cpu cap (nano cpus)");
    want(h.pids_limit == Some(p.pids_limit), "pids limit");
    want(
        h.cap_drop.as_ref() == Some(&p.cap_drop) && p.cap_drop.iter().any(|c| c == "ALL"),
        "cap_drop ALL",
    );
    want(h.cap_add.as_ref().is_none_or(|c| c.is_empty()), "no added capabilities");
    want(
        h.security_opt.as_ref() == Some(&p.security_opt)
            && p.security_opt.iter().any(|s| s.starts_with("no-new-privileges")),
        "no-new-privileges",
    );
    want(h.privileged != Some(true), "not privileged");
    want(
        h.binds.as_ref().is_none_or(|b| b.iter().all(|b| is_relay_bind(b)))
            && h.mounts.as_ref().is_none_or(|m| m.is_empty()),
        "no host mounts but the egress relay's read-only ones",
    );
    want(
        h.network_mode
            .as_ref()
            .is_some_and(|n| !p.forbidden_networks.contains(n)),
        "network mode",
    );
    want(
        body.labels
            .as_ref()
            .is_some_and(|l| l.get(&p.label).map(String::as_str) == Some("true")),
        "our label",
    );
    want(
        body.labels
            .as_ref()
            .is_some_and(|l| l.get(&p.install_label).is_some_and(|v| !v.is_empty())),
        "this install's label",
    );
    bad
}

/// One of the relay's mounts: its files or the proxy socket, read-only.
fn is_relay_bind(b: &str) -> bool {
    use super::relay::{MOUNT, SOCKET};
    b.strip_suffix(":ro")
        .and_then(|b| b.rsplit_once(':'))
        .is_some_and(|(_, target)| target == MOUNT || target == SOCKET)
}

/// For a restricted config: what in the request would let the container
/// out another way than the relay to our proxy. Empty when the request is
/// restricted.
pub fn egress_mismatches(e: &EgressProfile, body: &ContainerCreateBody) -> Vec<String> {
    let mut bad = Vec::new();
    let h = body.host_config.clone().unwrap_or_default();
    if h.network_mode.as_deref() != Some(NO_NETWORK) {
        bad.push(format!("network mode is not `{NO_NETWORK}`"));
    }
    let env = body.env.clone().unwrap_or_default();
    if !env.contains(&format!("HTTPS_PROXY=http://{}", e.relay_listen)) {
        bad.push("HTTPS_PROXY is not the relay".into());
    }
    let relay_first = body
        .entrypoint
        .as_ref()
        .is_some_and(|ep| ep.iter().take(6).any(|a| a == super::relay::MODE));
    let socket_mounted = h
        .binds
        .as_ref()
        .is_some_and(|b| b.iter().any(|b| b.ends_with(&format!(":{}:ro", super::relay::SOCKET))));
    if !relay_first || !socket_mounted {
        bad.push("no egress relay".into());
    }
    let ipv6_off = h
        .sysctls
        .as_ref()
        .and_then(|s| s.get(DISABLE_IPV6.0))
        .is_some_and(|v| v == DISABLE_IPV6.1);
    if !ipv6_off {
        bad.push("IPv6 not disabled".into());
    }
    if body
        .networking_config
        .as_ref()
        .and_then(|n| n.endpoints_config.as_ref())
        .is_some_and(|e| !e.is_empty())
    {
        bad.push("extra network endpoints".into());
    }
    bad
}

/// The relay setup as a job gets it, with placeholder paths: for checks
/// that look at the request's shape without starting a job.
pub fn example_relay(e: &EgressProfile) -> RelaySetup {
    let files = super::relay::RelayFiles {
        dir: "/run/user/UID/claude-max-market/relay-ID".into(),
        loader: Some("ld-linux-x86-64.so.2".into()),
    };
    RelaySetup {
        entrypoint: files.entrypoint(e.relay_listen, &["/usr/local/bin/entrypoint.sh".to_string()]),
        binds: files.binds(std::path::Path::new("/run/user/UID/claude-max-market/egress-JOB.sock")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_profile_parses_and_the_request_matches_it() {
        let p = profile().unwrap();
        let r = Resources {
            memory: 512 << 20,
            cpu_shares: 512,
            network: "bridge".into(),
            proxy: None,
            relay: None,
            workspace: None,
        };
        let body = create_body(p, &r, &Launch::example("img"));
        assert_eq!(mismatches(p, &body), Vec::<String>::new());
        // A workspace of the profile's shape is allowed; another is not.
        let ws = create_body(
            p,
            &Resources {
                workspace: Some(100 << 20),
                ..r.clone()
            },
            &Launch::example("img"),
        );
        assert_eq!(mismatches(p, &ws), Vec::<String>::new());
        assert_eq!(ws.working_dir.as_deref(), Some("/workspace"));
        let mut loose_ws = ws.clone();
        loose_ws
            .host_config
            .as_mut()
            .unwrap()
            .tmpfs
            .as_mut()
            .unwrap()
            .insert("/workspace".into(), "rw,size=1g".into());
        assert_eq!(mismatches(p, &loose_ws), vec!["tmpfs mounts".to_string()]);
        let mut mounted = body.clone();
        mounted.host_config.as_mut().unwrap().binds = Some(vec!["/home/u:/work".into()]);
        assert_eq!(
            mismatches(p, &mounted),
            vec!["no host mounts but the egress relay's read-only ones".to_string()]
        );
        let mut loose = body.clone();
        loose.host_config.as_mut().unwrap().readonly_rootfs = Some(false);
        assert_eq!(mismatches(p, &loose), vec!["read-only rootfs".to_string()]);
    }

    #[test]
    fn a_restricted_request_has_no_way_out_but_the_proxy() {
        let p = profile().unwrap();
        let e = super::super::profile::egress().unwrap();
        let r = Resources {
            memory: 512 << 20,
            cpu_shares: 512,
            network: NO_NETWORK.into(),
            proxy: Some(format!("http://{}", e.relay_listen)),
            relay: Some(example_relay(e)),
            workspace: None,
        };
        let body = create_body(p, &r, &Launch::example("img"));
        assert_eq!(mismatches(p, &body), Vec::<String>::new());
        assert_eq!(egress_mismatches(e, &body), Vec::<String>::new());
        let open = create_body(
            p,
            &Resources {
                network: "bridge".into(),
                proxy: None,
                relay: None,
                ..r
            },
            &Launch::example("img"),
        );
        assert_eq!(
            egress_mismatches(e, &open).len(),
            4,
            "network, proxy, relay and IPv6 all named"
        );
        // A writable relay mount is a host mount like any other.
        let mut rw = body.clone();
        let binds = rw.host_config.as_mut().unwrap().binds.as_mut().unwrap();
        binds[0] = binds[0].trim_end_matches(":ro").to_string();
        assert_eq!(
            mismatches(p, &rw),
            vec!["no host mounts but the egress relay's read-only ones".to_string()]
        );
    }
}
