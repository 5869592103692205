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

    /// How to run this binary inside the container (through its own
    /// loader, so the image needs nothing).
    pub fn command(&self, args: &[&str]) -> Vec<String> {
        let mut argv = match &self.loader {
            Some(ld) => vec![
                format!("{MOUNT}/lib/{ld}"),
                "--library-path".to_string(),
                format!("{MOUNT}/lib"),
                format!("{MOUNT}/cmm"),
            ],
            None => vec![format!("{MOUNT}/cmm")],
        };
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }

    /// The container entrypoint: the relay, then (after `--`) the image's
    /// own entrypoint, which the relay `exec`s once it listens.
    pub fn entrypoint(&self, listen: SocketAddr, image_entrypoint: &[String]) -> Vec<String> {
        self.entrypoint_with(Some(listen), None, image_entrypoint)
    }

    /// The entrypoint with the relay (`listen`) or without it (open
    /// egress), and with or without the hold of a workspace job (`hold`:
    /// its nonce; see [`main`]).
    pub fn entrypoint_with(
        &self,
        listen: Option<SocketAddr>,
        hold: Option<&str>,
        image_entrypoint: &[String],
    ) -> Vec<String> {
        let (l, s) = match listen {
            Some(l) => (l.to_string(), SOCKET.to_string()),
            None => ("-".to_string(), "-".to_string()),
        };
        let mut args = vec![MODE, &l, &s];
        if let Some(nonce) = hold {
            args.extend(["--hold", nonce]);
        }
        args.push("--");
        let mut argv = self.command(&args);
        argv.extend(image_entrypoint.iter().cloned());
        argv
    }

    /// The read-only mount of these files alone (a job with no relay).
    pub fn files_bind(&self) -> String {
        format!("{}:{MOUNT}:ro", self.dir.display())
    }

    /// The two read-only mounts: these files, and the proxy's socket.
    pub fn binds(&self, socket: &Path) -> Vec<String> {
        vec![self.files_bind(), format!("{}:{SOCKET}:ro", socket.display())]
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

/// `__egress-relay LISTEN SOCKET [--hold NONCE] -- ENTRYPOINT...`: bind
/// LISTEN, fork a child that carries every connection to SOCKET, and `exec`
/// the entrypoint in this process. Returns only on failure (an exit code).
///
/// LISTEN and SOCKET may both be `-`: no relay (open egress), for a job
/// that still needs the hold.
///
/// With `--hold NONCE` (a job with a workspace) this process stays the
/// container's init instead of becoming the entrypoint: it runs the
/// entrypoint as a child, and when that ends (or on `SIGUSR1`, which kills
/// it) it stops every other process of the job, prints
/// `{"type":"cmm_hold","nonce":NONCE,"exit_code":N}` on stdout, after all
/// of the job's own output, and waits to be removed. Meanwhile the host
/// copies the workspace out with `docker exec`: the container, its
/// size-limited workspace tmpfs included, outlives the job.
pub fn main(args: &[String]) -> i32 {
    let fail = |msg: String| {
        eprintln!("claude-max-market egress relay: {msg}");
        // EX_UNAVAILABLE: the job cannot run without its way out.
        69
    };
    let usage = || format!("usage: {MODE} LISTEN SOCKET [--hold NONCE] -- COMMAND...");
    let (listen, socket, hold, rest) = match args {
        [listen, socket, flag, nonce, dash, rest @ ..] if flag == "--hold" && dash == "--" && !rest.is_empty() => {
            (listen, socket, Some(nonce.as_str()), rest)
        }
        [listen, socket, dash, rest @ ..] if dash == "--" && !rest.is_empty() => (listen, socket, None, rest),
        _ => return fail(usage()),
    };
    let listener = if listen == "-" && socket == "-" {
        None
    } else {
        let Ok(addr) = listen.parse::<SocketAddr>() else {
            return fail(format!("`{listen}` is not an address"));
        };
        match std::net::TcpListener::bind(addr) {
            Ok(l) => Some(l),
            Err(e) => return fail(format!("cannot listen on {addr}: {e}")),
        }
    };
    let argv: Vec<CString> = match rest.iter().map(|a| CString::new(a.as_bytes())).collect() {
        Ok(v) => v,
        Err(_) => return fail("an argument contains a NUL byte".into()),
    };
    if let Some(listener) = listener {
        // SAFETY: this process is single-threaded here (nothing has started a
        // thread before relay mode), so the child may run arbitrary code.
        match unsafe { libc::fork() } {
            -1 => return fail(format!("fork: {}", io::Error::last_os_error())),
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
            _ => drop(listener),
        }
    }
    match hold {
        None => {
            exec(&argv);
            fail(format!("cannot run `{}`: {}", rest[0], io::Error::last_os_error()))
        }
        Some(nonce) => hold_main(&argv, nonce),
    }
}

/// The line the hold prints once the job has ended (see [`main`]).
pub fn hold_marker(nonce: &str, exit_code: i32) -> String {
    format!(r#"{{"type":"cmm_hold","nonce":"{nonce}","exit_code":{exit_code}}}"#)
}

/// `exec` argv; returns only if that failed.
fn exec(argv: &[CString]) {
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: argv is a NULL-terminated array of NUL-terminated strings.
    unsafe { libc::execvp(ptrs[0], ptrs.as_ptr()) };
}

/// The job's entrypoint, as the hold's child: its pid, for the SIGUSR1
/// handler.
static JOB_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn stop_job(_: libc::c_int) {
    let pid = JOB_PID.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

fn hold_main(argv: &[CString], nonce: &str) -> i32 {
    // SAFETY: still single-threaded; the handler only calls kill(2).
    unsafe {
        libc::signal(
            libc::SIGUSR1,
            stop_job as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    // SAFETY: as above; the child only sets its process group and execs.
    let child = unsafe { libc::fork() };
    if child == -1 {
        eprintln!("claude-max-market hold: fork: {}", io::Error::last_os_error());
        return 69;
    }
    if child == 0 {
        // SAFETY: plain syscalls in the child of a single-threaded process.
        unsafe {
            libc::setpgid(0, 0);
            libc::signal(libc::SIGUSR1, libc::SIG_DFL);
        }
        exec(argv);
        eprintln!(
            "claude-max-market hold: cannot run the entrypoint: {}",
            io::Error::last_os_error()
        );
        // SAFETY: leaving the child without running the parent's atexit.
        unsafe { libc::_exit(127) }
    }
    JOB_PID.store(child, std::sync::atomic::Ordering::SeqCst);
    // Reap everything that ends (orphans are ours as init) until the job's
    // own entrypoint does.
    let code = loop {
        let mut status = 0;
        // SAFETY: waitpid on any child with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == child {
            break if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
        }
        if pid == -1 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break 1;
        }
    };
    JOB_PID.store(0, std::sync::atomic::Ordering::SeqCst);
    // Nothing of the job may go on touching the workspace while it is
    // copied out: stop whatever it left running (the relay too: the job
    // needs no network any more), then reap it.
    // SAFETY: kill(-1) from init signals every other process in the
    // container's namespace; waitpid as above.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        let mut status = 0;
        while libc::waitpid(-1, &mut status, 0) > 0 {}
    }
    let line = format!("\n{}\n", hold_marker(nonce, code));
    // SAFETY: write(2) on stdout with a valid buffer.
    unsafe {
        libc::write(1, line.as_ptr().cast(), line.len());
    }
    // Wait to be removed; keep reaping what the copy-out leaves.
    loop {
        let mut status = 0;
        // SAFETY: as above.
        if unsafe { libc::waitpid(-1, &mut status, 0) } == -1 {
            // SAFETY: pause(2) has no preconditions.
            unsafe { libc::pause() };
        }
    }
}

fn serve(listener: std::net::TcpListener, socket: PathBuf) {
    let Ok(rt) = crate::runtime::current_thread() else {
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
