//! The egress relay: the one process in a job container's network namespace
//! that can reach anything outside it.
//!
//! A restricted job container has no network at all (`NetworkMode: none`:
//! a loopback interface and nothing else), so there is no route, no DNS, no
//! IPv6 and no host address to reach. Its way out is a Unix socket, mounted
//! read-only from the host, on which `execute`'s own proxy listens (see
//! [`super::egress`]). Claude Code speaks TCP to an `HTTPS_PROXY`, so this
//! relay, a mode of this same binary, listens on the container's loopback and
//! carries each connection, byte for byte, to that socket. It decides
//! nothing: the allowlist and the counters live in the proxy on the host.
//!
//! The binary and the shared libraries it was loaded with are copied once per
//! build into a private, per-user directory ([`RelayFiles::prepare`]) and
//! mounted read-only at `/.cmm`. The container's entrypoint becomes
//! `/.cmm/… egress-relay … -- <the image's entrypoint>`: the relay binds,
//! forks a child that serves, and `exec`s the image's own entrypoint, so the
//! job runs exactly as before with one more process beside it. Nothing
//! depends on what the image contains (it works on a `FROM scratch` image),
//! and the mounted paths say nothing about the user but their uid.

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The first argument that selects relay mode (internal: only our own
/// container entrypoint passes it, so it is not a documented command).
pub const MODE: &str = "__egress-relay";

/// Where the relay files appear inside the container.
pub const MOUNT: &str = "/.cmm";

/// Where the proxy's socket appears inside the container.
pub const SOCKET: &str = "/.cmm-egress.sock";

/// The per-user directory for relay files and proxy sockets:
/// `$XDG_RUNTIME_DIR/claude-max-market`, else `<tmp>/claude-max-market-<uid>`,
/// owned by this user (anything else is refused) and kept at mode 0700.
pub fn base_dir() -> io::Result<PathBuf> {
    // SAFETY: getuid cannot fail and has no preconditions.
    let uid = unsafe { libc::getuid() };
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() && d.is_dir() => d.join("claude-max-market"),
        _ => std::env::temp_dir().join(format!("claude-max-market-{uid}")),
    };
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = fs::symlink_metadata(&dir)?;
    if !m.is_dir() || m.uid() != uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} must be a directory owned by you (uid {uid}); remove it and try again",
                dir.display()
            ),
        ));
    }
    // Ours, so nobody else could have put anything in it: just close it.
    if m.mode() & 0o077 != 0 {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(dir)
}

/// This binary and its libraries, ready to mount.
#[derive(Debug, Clone)]
pub struct RelayFiles {
    /// The directory mounted at [`MOUNT`].
    pub dir: PathBuf,
    /// Basename of the dynamic loader under `lib/`, when the binary has one.
    pub loader: Option<String>,
}

impl RelayFiles {
    /// Copy this binary (`cmm`) and every shared object it is running with
    /// (`lib/`) into `relay-<id>` under `base`, once per build: the id is
    /// taken from the binary's identity on disk. The copy is made in a
    /// temporary directory and renamed into place, so a half-made one is
    /// never used.
    pub fn prepare(base: &Path) -> io::Result<RelayFiles> {
        let (exe, id) = this_build()?;
        let dir = base.join(format!("relay-{id}"));
        if !dir.join("cmm").exists() {
            let tmp = base.join(format!(".relay-{id}.tmp-{}", hex::encode(rand::random::<[u8; 6]>())));
            let made = (|| {
                fs::create_dir_all(tmp.join("lib"))?;
                fs::copy(&exe, tmp.join("cmm"))?;
                for lib in mapped_libraries(&exe)? {
                    if let Some(name) = lib.file_name() {
                        fs::copy(&lib, tmp.join("lib").join(name))?;
                    }
                }
                // Readable by the container's own user, writable by nobody.
                for p in [tmp.join("cmm")]
                    .into_iter()
                    .chain(fs::read_dir(tmp.join("lib"))?.flatten().map(|e| e.path()))
                {
                    fs::set_permissions(&p, fs::Permissions::from_mode(0o555))?;
                }
                fs::set_permissions(tmp.join("lib"), fs::Permissions::from_mode(0o555))?;
                fs::set_permissions(&tmp, fs::Permissions::from_mode(0o555))?;
                crate::fsutil::sync_dir(base)
            })();
            let placed = made.and_then(|()| fs::rename(&tmp, &dir));
            if placed.is_ok() {
                // A new build: copies of builds unused for a day go.
                sweep(base, Some(&dir), std::time::Duration::from_secs(86_400));
            }
            if let Err(e) = placed {
                remove_tree(&tmp);
                // Another job put the same files in place meanwhile.
                if !dir.join("cmm").exists() {
                    return Err(e);
                }
            }
        }
        // The loader, from the copy itself: once the copy exists, nothing
        // of this process needs reading again.
        let loader = fs::read_dir(dir.join("lib"))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .find(|n| n.starts_with("ld-linux") || n.starts_with("ld-musl"));
        Ok(RelayFiles { dir, loader })
    }

    /// `relay-<id>` under `base` for this binary (see [`this_build`]).
    pub fn dir_for_this_build(base: &Path) -> io::Result<PathBuf> {
        Ok(base.join(format!("relay-{}", this_build()?.1)))
    }

    /// The container entrypoint: the relay, then (after `--`) the image's
    /// own entrypoint, which the relay `exec`s once it listens.
    pub fn entrypoint(&self, listen: SocketAddr, image_entrypoint: &[String]) -> Vec<String> {
        let mut argv = match &self.loader {
            Some(ld) => vec![
                format!("{MOUNT}/lib/{ld}"),
                "--library-path".to_string(),
                format!("{MOUNT}/lib"),
                format!("{MOUNT}/cmm"),
            ],
            None => vec![format!("{MOUNT}/cmm")],
        };
        argv.extend([
            MODE.to_string(),
            listen.to_string(),
            SOCKET.to_string(),
            "--".to_string(),
        ]);
        argv.extend(image_entrypoint.iter().cloned());
        argv
    }

    /// The two read-only mounts: these files, and the proxy's socket.
    pub fn binds(&self, socket: &Path) -> Vec<String> {
        vec![
            format!("{}:{MOUNT}:ro", self.dir.display()),
            format!("{}:{SOCKET}:ro", socket.display()),
        ]
    }
}

/// This binary's path, and an id for this build: a hash of the path and
/// its identity on disk, so a rebuilt or upgraded binary gets a new copy.
fn this_build() -> io::Result<(PathBuf, String)> {
    let exe = fs::read_link("/proc/self/exe")?;
    let meta = fs::metadata(&exe)?;
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION"));
    h.update(exe.as_os_str().as_encoded_bytes());
    for n in [
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
    ] {
        h.update(n.to_le_bytes());
    }
    Ok((exe, hex::encode(&h.finalize()[..8])))
}

/// Every file-backed executable mapping of this process but the binary
/// `exe` itself: the loader and the shared libraries, exactly the ones in use.
fn mapped_libraries(exe: &Path) -> io::Result<Vec<PathBuf>> {
    let maps = fs::read_to_string("/proc/self/maps")?;
    let mut out: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let perms = f.nth(1).unwrap_or_default();
        let Some(path) = f.nth(3) else { continue };
        if !perms.contains('x') || !path.starts_with('/') {
            continue;
        }
        let p = PathBuf::from(path);
        if p != *exe && !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

fn remove_tree(dir: &Path) {
    // The copies are read-only; make them removable first.
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = fs::set_permissions(e.path(), fs::Permissions::from_mode(0o700));
        }
    }
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let _ = fs::set_permissions(dir.join("lib"), fs::Permissions::from_mode(0o700));
    let _ = fs::remove_dir_all(dir);
}

/// Remove relay copies of other builds (not used for `min_age`) and proxy
/// sockets nobody listens on any more. Returns how many were removed.
pub fn sweep(base: &Path, keep: Option<&Path>, min_age: std::time::Duration) -> usize {
    let Ok(entries) = fs::read_dir(base) else { return 0 };
    let mut removed = 0;
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|a| a >= min_age);
        if name.ends_with(".sock") {
            // A socket whose proxy is gone refuses connections.
            if std::os::unix::net::UnixStream::connect(&path).is_err() && fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        } else if (name.starts_with("relay-") || name.starts_with(".relay-")) && Some(path.as_path()) != keep && old {
            remove_tree(&path);
            removed += 1;
        }
    }
    removed
}

// ---------------------------------------------------------------------------
// Relay mode (inside the container)

/// `__egress-relay LISTEN SOCKET -- ENTRYPOINT...`: bind LISTEN, fork a child
/// that carries every connection to SOCKET, and `exec` the entrypoint in
/// this process. Returns only on failure (an exit code).
pub fn main(args: &[String]) -> i32 {
    let fail = |msg: String| {
        eprintln!("claude-max-market egress relay: {msg}");
        // EX_UNAVAILABLE: the job cannot run without its way out.
        69
    };
    let (listen, socket, rest) = match args {
        [listen, socket, dash, rest @ ..] if dash == "--" && !rest.is_empty() => (listen, socket, rest),
        _ => return fail(format!("usage: {MODE} LISTEN SOCKET -- COMMAND...")),
    };
    let Ok(listen) = listen.parse::<SocketAddr>() else {
        return fail(format!("`{listen}` is not an address"));
    };
    let listener = match std::net::TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {listen}: {e}")),
    };
    let argv: Vec<CString> = match rest.iter().map(|a| CString::new(a.as_bytes())).collect() {
        Ok(v) => v,
        Err(_) => return fail("an argument contains a NUL byte".into()),
    };
    // SAFETY: this process is single-threaded here (nothing has started a
    // thread before relay mode), so the child may run arbitrary code.
    match unsafe { libc::fork() } {
        -1 => fail(format!("fork: {}", io::Error::last_os_error())),
        0 => {
            // The child: no stdio (stdout is the job's event stream, stdin
            // its credential and prompt).
            // SAFETY: plain syscalls on valid fds and a NUL-terminated path.
            unsafe {
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    for fd in 0..3 {
                        libc::dup2(null, fd);
                    }
                }
            }
            serve(listener, PathBuf::from(socket));
            // SAFETY: leaving the child without running the parent's atexit.
            unsafe { libc::_exit(0) }
        }
        _ => {
            drop(listener);
            let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
            ptrs.push(std::ptr::null());
            // SAFETY: argv is a NULL-terminated array of NUL-terminated strings.
            unsafe { libc::execvp(ptrs[0], ptrs.as_ptr()) };
            fail(format!("cannot run `{}`: {}", rest[0], io::Error::last_os_error()))
        }
    }
}

fn serve(listener: std::net::TcpListener, socket: PathBuf) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_io().build() else {
        return;
    };
    rt.block_on(async move {
        if listener.set_nonblocking(true).is_err() {
            return;
        }
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let socket = socket.clone();
            tokio::spawn(async move {
                let Ok(mut up) = tokio::net::UnixStream::connect(&socket).await else {
                    return;
                };
                let _ = conn.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional_with_sizes(&mut conn, &mut up, 64 << 10, 64 << 10).await;
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entrypoint_runs_the_relay_then_the_image_entrypoint() {
        let f = RelayFiles {
            dir: "/x/relay-1".into(),
            loader: Some("ld-linux-x86-64.so.2".into()),
        };
        let argv = f.entrypoint(
            "127.0.0.1:3128".parse().unwrap(),
            &["/usr/local/bin/entrypoint.sh".into()],
        );
        assert_eq!(
            argv,
            [
                "/.cmm/lib/ld-linux-x86-64.so.2",
                "--library-path",
                "/.cmm/lib",
                "/.cmm/cmm",
                MODE,
                "127.0.0.1:3128",
                SOCKET,
                "--",
                "/usr/local/bin/entrypoint.sh"
            ]
        );
        assert_eq!(
            f.binds(Path::new("/x/e.sock")),
            ["/x/relay-1:/.cmm:ro", "/x/e.sock:/.cmm-egress.sock:ro"]
        );
    }

    #[test]
    fn this_process_maps_its_loader_and_libc() {
        let libs = mapped_libraries(&fs::read_link("/proc/self/exe").unwrap()).unwrap();
        let names: Vec<String> = libs
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect();
        assert!(names.iter().any(|n| n.starts_with("libc")), "{names:?}");
        assert!(names.iter().any(|n| n.starts_with("ld-")), "{names:?}");
    }

    #[test]
    fn prepare_copies_once_and_reuses() {
        let base = tempfile::tempdir().unwrap();
        let a = RelayFiles::prepare(base.path()).unwrap();
        let b = RelayFiles::prepare(base.path()).unwrap();
        assert_eq!(a.dir, b.dir);
        assert!(a.dir.join("cmm").is_file());
        assert_eq!(fs::metadata(a.dir.join("cmm")).unwrap().mode() & 0o777, 0o555);
        assert!(a.loader.is_some());
        // Nothing else but the one copy.
        assert_eq!(fs::read_dir(base.path()).unwrap().count(), 1);
        assert_eq!(sweep(base.path(), Some(&a.dir), std::time::Duration::ZERO), 0);
        assert_eq!(sweep(base.path(), None, std::time::Duration::ZERO), 1);
        assert_eq!(fs::read_dir(base.path()).unwrap().count(), 0);
    }
}
