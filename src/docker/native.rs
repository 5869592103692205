//! The runner image from the native Claude Code already on this machine:
//! `docker build --claude-binary PATH`, with no registry and no network.
//!
//! The image is `FROM scratch` plus files of this host, and its Dockerfile
//! has only COPY, ENV, LABEL and USER steps (and metadata: WORKDIR,
//! ENTRYPOINT, CMD). Nothing runs while it builds, so the build cannot need
//! a network, and the same inputs give the same layers: a warm rebuild is
//! all cache hits.
//!
//! What goes in (paths inside the image):
//!
//! | path | from |
//! |---|---|
//! | `/usr/local/bin/claude` | the binary, in a layer of its own and first: it is 400 MB and changes only with its version, so a change elsewhere never sends it to a new layer |
//! | `/bin/sh`, `/bin/bash` | the host's `/bin/sh` and `bash`: Claude Code's Bash tool will not start without a POSIX shell |
//! | `/bin/busybox`, `/usr/bin/<applet>` | the host's busybox (Debian's `busybox-static`), when it has one: the coreutils, `grep`, `sed`, `find`, `diff`, ... that Claude Code's tools call. Every applet it has but the shells, which the host's own are |
//! | the loader and each shared library | what the host's loader resolves for each binary above (`ld.so --list`), at the same paths, with the host's `/etc/ld.so.cache`, so the container's loader finds exactly what the host's found |
//! | `/etc/ssl/certs/ca-certificates.crt` | the host's CA bundle |
//! | `/etc/ssl/certs/cmm-extra-ca.pem` | `--extra-ca`, named by `NODE_EXTRA_CA_CERTS` (Claude Code adds it to the CAs it trusts) |
//! | `/etc/passwd`, `/etc/group`, `/etc/nsswitch.conf` | written here: the job user (`container.user` in security-config.json, uid 10001 `claude`, home `/home/claude`) |
//! | `/usr/local/bin/entrypoint.sh` | the entrypoint embedded in this binary |
//! | `/home/claude`, `/workspace` | empty, owned by the job user, mode 0755 |
//! | `/tmp` | empty, mode 1777 |
//!
//! Git is not copied: it is a binary plus helpers, templates and config
//! spread over the host, and Claude Code works without it (the embedded
//! Dockerfile's image has it). Nor is ripgrep: the native binary has its own.
//!
//! The context is written as a tar on a blocking thread while the engine
//! reads it, so the 400 MB binary costs neither memory nor a temporary file.
//!
//! This module owns checking the inputs, collecting the context and
//! streaming it. It must not run anything from the image or reach a
//! registry, and it leaves following the engine's answers to `build`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use bollard::query_parameters::BuildImageOptions;
use bollard::Docker;
use indicatif::HumanBytes;
use sha2::{Digest, Sha256};

use super::build::{note, run_build, ImageProgress, Upload, EMBEDDED_ENTRYPOINT, LONG_REQUEST};
use super::profile::Profile;
use super::DockerError;
use crate::exit::{Exit, HasExit};

/// Label holding the Claude Code version an image runs (both image kinds).
pub const VERSION_LABEL: &str = "dev.claude-max-market.claude-code-version";

/// The environment every runner image sets, besides `HOME` (the profile's
/// home). The embedded Dockerfile sets the same; a test holds them equal.
pub const RUNNER_ENV: &[(&str, &str)] = &[
    ("DISABLE_AUTOUPDATER", "1"),
    ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
    ("DISABLE_TELEMETRY", "1"),
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
];

/// Where `--extra-ca` goes in the image, and what `NODE_EXTRA_CA_CERTS` names.
pub const EXTRA_CA_PATH: &str = "/etc/ssl/certs/cmm-extra-ca.pem";

/// Where the host's CA bundle goes in the image.
pub const CA_BUNDLE_PATH: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Host CA bundles, in the order distributions name them.
const HOST_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

const HOST_BUSYBOX: &[&str] = &["/bin/busybox", "/usr/bin/busybox"];

/// `claude --version` reads a 400 MB file: cold from disk that takes a few
/// seconds, never this long.
const VERSION_TIMEOUT: Duration = Duration::from_secs(30);

/// Anything else we run on the host (`ld.so --list`, `busybox --list`).
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes per chunk handed to the engine.
const CHUNK: usize = 1 << 20;

/// A CA file larger than this is not a CA file.
const MAX_CA_BYTES: u64 = 1 << 20;

const INSTALL_HINT: &str = "pass the native Claude Code binary, e.g. `--claude-binary ~/.local/bin/claude` \
     (`curl -fsSL https://claude.ai/install.sh | bash` installs it; `claude install` turns an npm install into one)";

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("`{0}` does not exist")]
    Missing(PathBuf),
    #[error("`{0}` is not a file")]
    NotFile(PathBuf),
    #[error("`{0}` is not executable")]
    NotExecutable(PathBuf),
    #[error("cannot read `{path}`: {source}")]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("`{path}` is a script (`{first_line}`), not the native Claude Code{}", if *.npm { ": it is the launcher npm installs" } else { "" })]
    Script {
        path: PathBuf,
        first_line: String,
        npm: bool,
    },
    #[error("`{0}` is not an ELF executable")]
    NotElf(PathBuf),
    #[error("`{path}` is an executable for {found}, not for this machine ({want})")]
    WrongMachine { path: PathBuf, found: String, want: String },
    #[error("`{path} --version` does not name Claude Code: {said}")]
    NotClaude { path: PathBuf, said: String },
    #[error("extra CA `{path}`: {why}")]
    BadCa { path: PathBuf, why: String },
    #[error("{0}")]
    Host(String),
    #[error("`docker.claudeBinary`: {0}")]
    Configured(Box<NativeError>),
}

impl HasExit for NativeError {
    fn exit(&self) -> Exit {
        match self {
            NativeError::Host(_) => Exit::Unavailable,
            NativeError::Configured(e) => e.exit(),
            _ => Exit::Usage,
        }
    }
    fn hint(&self) -> Option<String> {
        Some(match self {
            NativeError::NotExecutable(p) => format!("make it executable (`chmod +x {}`), or {INSTALL_HINT}", p.display()),
            NativeError::WrongMachine { want, .. } => format!("use the Claude Code build for {want}; {INSTALL_HINT}"),
            NativeError::BadCa { .. } => "give a PEM file holding only the CA certificate(s) (`-----BEGIN CERTIFICATE-----`); \
                 convert a DER one with `openssl x509 -inform der -in FILE -out FILE.pem`"
                .into(),
            NativeError::Host(_) => "install what is missing, or build from the embedded Dockerfile where a registry is reachable (`claude-max-market docker build`)".into(),
            NativeError::Configured(e) => format!(
                "{}; or clear it: `claude-max-market config --unset docker.claudeBinary`",
                e.hint().unwrap_or_default()
            ),
            _ => INSTALL_HINT.into(),
        })
    }
}

// ---------------------------------------------------------------------------
// The binary

/// A native Claude Code, checked.
#[derive(Debug, Clone)]
pub struct ClaudeBinary {
    /// As given.
    pub path: PathBuf,
    /// The file itself, symlinks resolved.
    pub file: PathBuf,
    /// `2.1.332` from `2.1.332 (Claude Code)`.
    pub version: String,
    pub size: u64,
    elf: Elf,
}

impl ClaudeBinary {
    /// Check that `path` is a native Claude Code for this machine: a file,
    /// executable, an ELF for this CPU, whose `--version` names Claude
    /// Code. Each failure says what `path` is instead.
    pub async fn inspect(path: &Path) -> Result<ClaudeBinary, NativeError> {
        let file = match fs::canonicalize(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(NativeError::Missing(path.into())),
            Err(source) => {
                return Err(NativeError::Unreadable {
                    path: path.into(),
                    source,
                })
            }
        };
        let meta = fs::metadata(&file).map_err(|source| NativeError::Unreadable {
            path: path.into(),
            source,
        })?;
        if !meta.is_file() {
            return Err(NativeError::NotFile(path.into()));
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(NativeError::NotExecutable(path.into()));
        }
        let elf = match read_elf(&file).map_err(|source| NativeError::Unreadable {
            path: path.into(),
            source,
        })? {
            Kind::Elf(e) => e,
            Kind::Script(first_line) => {
                let npm = first_line.contains("node") || file.components().any(|c| c.as_os_str() == "node_modules");
                return Err(NativeError::Script {
                    path: path.into(),
                    first_line,
                    npm,
                });
            }
            Kind::Other => return Err(NativeError::NotElf(path.into())),
        };
        elf.check_machine(path)?;
        let version = claude_version(path).await?;
        Ok(ClaudeBinary {
            path: path.into(),
            file,
            version,
            size: meta.len(),
            elf,
        })
    }
}

/// The first `claude` on `PATH` (not yet checked: it may be npm's script).
pub fn on_path() -> Option<PathBuf> {
    which("claude")
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

async fn claude_version(path: &Path) -> Result<String, NativeError> {
    let not_claude = |said: String| NativeError::NotClaude {
        path: path.into(),
        said,
    };
    let mut cmd = tokio::process::Command::new(path);
    cmd.arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Whatever it is, it must not go online or update itself to answer.
    for (k, v) in RUNNER_ENV.iter().filter(|(k, _)| *k != "PATH") {
        cmd.env(k, v);
    }
    let out = match tokio::time::timeout(VERSION_TIMEOUT, cmd.output()).await {
        Err(_) => return Err(not_claude(format!("no answer within {} s", VERSION_TIMEOUT.as_secs()))),
        Ok(Err(e)) => return Err(not_claude(format!("it did not run ({e})"))),
        Ok(Ok(o)) => o,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    match parse_version(&stdout) {
        Some(v) if out.status.success() => Ok(v),
        _ => {
            let said = stdout
                .lines()
                .chain(String::from_utf8_lossy(&out.stderr).lines())
                .find(|l| !l.trim().is_empty())
                .map(|l| format!("it printed `{}`", l.trim().chars().take(120).collect::<String>()))
                .unwrap_or_else(|| "it printed nothing".into());
            Err(not_claude(format!("{said} ({})", out.status)))
        }
    }
}

/// `2.1.332 (Claude Code)` -> `2.1.332`.
pub fn parse_version(text: &str) -> Option<String> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let v = line.strip_suffix("(Claude Code)")?.trim_end();
    let numeric = v.split(['-', '+']).next()?;
    let parts: Vec<&str> = numeric.split('.').collect();
    let ok = (2..=4).contains(&parts.len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
    ok.then(|| v.to_string())
}

// ---------------------------------------------------------------------------
// ELF, as much as we need of it: the machine and the interpreter.

#[derive(Debug, Clone, PartialEq, Eq)]
struct Elf {
    class: u8,
    little_endian: bool,
    machine: u16,
    /// `PT_INTERP`: the dynamic loader, `None` for a static executable.
    interp: Option<PathBuf>,
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Elf(Elf),
    /// The first line of a `#!` script.
    Script(String),
    Other,
}

const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;

/// (machine, name) of the CPU this binary was built for.
fn this_machine() -> (Option<u16>, &'static str) {
    match std::env::consts::ARCH {
        "x86_64" => (Some(EM_X86_64), "x86-64"),
        "aarch64" => (Some(EM_AARCH64), "AArch64"),
        other => (None, other),
    }
}

fn machine_name(class: u8, machine: u16) -> String {
    let name = match machine {
        3 => "x86 (32-bit)",
        8 => "MIPS",
        20 => "PowerPC",
        21 => "PowerPC 64",
        22 => "s390",
        40 => "ARM (32-bit)",
        EM_X86_64 => "x86-64",
        EM_AARCH64 => "AArch64",
        243 => "RISC-V",
        _ => return format!("ELF machine {machine} ({}-bit)", if class == 2 { 64 } else { 32 }),
    };
    name.to_string()
}

impl Elf {
    fn check_machine(&self, path: &Path) -> Result<(), NativeError> {
        let (want, want_name) = this_machine();
        if want == Some(self.machine) && self.class == 2 && self.little_endian {
            return Ok(());
        }
        Err(NativeError::WrongMachine {
            path: path.into(),
            found: machine_name(self.class, self.machine),
            want: want_name.to_string(),
        })
    }
}

fn read_elf(path: &Path) -> io::Result<Kind> {
    let f = File::open(path)?;
    let mut head = [0u8; 64];
    let n = read_up_to(&f, 0, &mut head)?;
    parse_elf(&head[..n], |offset, buf| f.read_exact_at(buf, offset))
}

fn read_up_to(f: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Tell an ELF from a script from anything else, and read an ELF64 LE's
/// machine and `PT_INTERP` (other ELFs only need their machine named).
fn parse_elf(head: &[u8], read_at: impl Fn(u64, &mut [u8]) -> io::Result<()>) -> io::Result<Kind> {
    if let Some(rest) = head.strip_prefix(b"#!") {
        let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
        return Ok(Kind::Script(format!("#!{}", String::from_utf8_lossy(line).trim())));
    }
    if head.len() < 20 || &head[..4] != b"\x7fELF" {
        return Ok(Kind::Other);
    }
    let class = head[4];
    let little_endian = head[5] == 1;
    let u16_at = |b: &[u8], o: usize| {
        let x = [b[o], b[o + 1]];
        if little_endian {
            u16::from_le_bytes(x)
        } else {
            u16::from_be_bytes(x)
        }
    };
    let machine = u16_at(head, 18);
    let mut elf = Elf {
        class,
        little_endian,
        machine,
        interp: None,
    };
    if class != 2 || !little_endian || head.len() < 64 {
        return Ok(Kind::Elf(elf));
    }
    let u64_at = |b: &[u8], o: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(x)
    };
    let (phoff, phentsize, phnum) = (u64_at(head, 32), u16_at(head, 54) as usize, u16_at(head, 56) as usize);
    if phentsize < 56 || phnum == 0 || phnum > 256 {
        return Ok(Kind::Elf(elf));
    }
    let mut table = vec![0u8; phentsize * phnum];
    read_at(phoff, &mut table)?;
    for ph in table.chunks_exact(phentsize) {
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP {
            let (offset, size) = (u64_at(ph, 8), u64_at(ph, 32) as usize);
            if size == 0 || size > 4096 {
                break;
            }
            let mut name = vec![0u8; size];
            read_at(offset, &mut name)?;
            let name = name.split(|&b| b == 0).next().unwrap_or_default();
            elf.interp = Some(PathBuf::from(String::from_utf8_lossy(name).into_owned()));
            break;
        }
    }
    Ok(Kind::Elf(elf))
}

// ---------------------------------------------------------------------------
// The extra CA

/// A PEM file of CA certificates, checked.
#[derive(Debug, Clone)]
pub struct ExtraCa {
    pub path: PathBuf,
    /// The certificate blocks only, as found.
    pub pem: String,
    /// Subject of each certificate.
    pub subjects: Vec<String>,
    /// Subjects of certificates already expired.
    pub expired: Vec<String>,
}

impl ExtraCa {
    pub fn read(path: &Path) -> Result<ExtraCa, NativeError> {
        let bad = |why: String| NativeError::BadCa { path: path.into(), why };
        let meta = fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => bad("it does not exist".into()),
            _ => bad(format!("cannot read it ({e})")),
        })?;
        if !meta.is_file() {
            return Err(bad("it is not a file".into()));
        }
        if meta.len() > MAX_CA_BYTES {
            return Err(bad(format!(
                "it is {} (more than a CA file ever is)",
                HumanBytes(meta.len())
            )));
        }
        let bytes = fs::read(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
        let text = String::from_utf8(bytes).map_err(|_| bad("it is not PEM text (a DER certificate?)".into()))?;
        let blocks = pem_blocks(&text).map_err(bad)?;
        if blocks.is_empty() {
            return Err(bad("it holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)".into()));
        }
        let now = SystemTime::now();
        let mut ca = ExtraCa {
            path: path.into(),
            pem: String::new(),
            subjects: Vec::new(),
            expired: Vec::new(),
        };
        for (i, (label, block)) in blocks.iter().enumerate() {
            if label != "CERTIFICATE" {
                let why = if label.contains("PRIVATE KEY") {
                    format!("block {} is a private key (`{label}`): give only the CA's certificate; a key must never go into an image", i + 1)
                } else {
                    format!("block {} is a `{label}`, not a certificate", i + 1)
                };
                return Err(bad(why));
            }
            use x509_cert::der::DecodePem;
            let cert = x509_cert::Certificate::from_pem(block.as_bytes())
                .map_err(|e| bad(format!("certificate {} does not parse as X.509 ({e})", i + 1)))?;
            let subject = cert.tbs_certificate.subject.to_string();
            if cert.tbs_certificate.validity.not_after.to_system_time() < now {
                ca.expired.push(subject.clone());
            }
            ca.subjects.push(subject);
            ca.pem.push_str(block);
            ca.pem.push('\n');
        }
        Ok(ca)
    }
}

/// `(label, whole block)` for each `-----BEGIN X-----` .. `-----END X-----`
/// (text between blocks, as openssl writes it, is allowed and dropped).
fn pem_blocks(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in text.lines().map(str::trim) {
        match &mut open {
            None => {
                if let Some(label) = line.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")) {
                    open = Some((label.to_string(), format!("{line}\n")));
                }
            }
            Some((label, block)) => {
                block.push_str(line);
                block.push('\n');
                if line.starts_with("-----END ") {
                    if line != format!("-----END {label}-----") {
                        return Err(format!("`-----BEGIN {label}-----` ends with `{line}`"));
                    }
                    if let Some((label, block)) = open.take() {
                        out.push((label, block.trim_end().to_string()));
                    }
                }
            }
        }
    }
    match open {
        Some((label, _)) => Err(format!("`-----BEGIN {label}-----` never ends")),
        None => Ok(out),
    }
}

// ---------------------------------------------------------------------------
// The plan: what goes into the image, from where

#[derive(Debug, Clone)]
enum Source {
    File { host: PathBuf, size: u64, hash: bool },
    Bytes(Vec<u8>),
    Symlink(String),
    Dir,
}

#[derive(Debug, Clone)]
struct Entry {
    source: Source,
    mode: u32,
}

impl Entry {
    fn size(&self) -> u64 {
        match &self.source {
            Source::File { size, .. } => *size,
            Source::Bytes(b) => b.len() as u64,
            _ => 0,
        }
    }
}

/// A host binary the image needs, with the libraries its loader resolves.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostTool {
    /// Where it goes in the image.
    pub image_path: String,
    /// The file on the host.
    pub host: PathBuf,
}

/// Everything checked and collected; nothing sent yet.
#[derive(Debug, Clone)]
pub struct Plan {
    pub claude: ClaudeBinary,
    pub extra_ca: Option<ExtraCa>,
    pub tools: Vec<HostTool>,
    /// Shared objects, by their path (the same on the host and in the image).
    pub libraries: Vec<PathBuf>,
    pub busybox_applets: usize,
    pub ca_bundle: PathBuf,
    /// The tar's size.
    pub bytes: u64,
    dockerfile: String,
    /// Tar path -> entry (sorted, so parents come first).
    entries: BTreeMap<String, Entry>,
}

impl Plan {
    /// Collect what the image of `claude` needs from this host. Runs the
    /// host loader's `--list` and `busybox --list`; reads nothing else but
    /// the files it copies.
    pub async fn collect(
        claude: ClaudeBinary,
        extra_ca: Option<ExtraCa>,
        profile: &Profile,
        progress: &dyn ImageProgress,
    ) -> Result<Plan, NativeError> {
        announce(&claude, extra_ca.as_ref(), progress);
        let (uid, gid) = numeric_user(&profile.user)?;
        let (tools, applets) = host_tools(progress).await?;
        let libraries = libraries(&claude, &tools).await?;
        let ca_bundle = host_ca_bundle()?;

        // The tar.
        let mut layout = Layout::default();
        layout.file("claude".into(), &claude.file, true)?;
        layout.host_files(&tools, &libraries, &ca_bundle)?;
        let linked = layout.applet_links(&tools, &applets);
        layout.written_files(profile, uid, gid, extra_ca.as_ref());
        let dockerfile = dockerfile(profile, uid, gid, &claude.version, extra_ca.is_some());
        layout.bytes("Dockerfile".into(), dockerfile.clone().into_bytes(), 0o644);
        let entries = layout.with_parents();
        let bytes = tar_size(&entries);
        note(
            progress,
            collected(
                &tools,
                linked,
                &libraries,
                entries.contains_key("rootfs/etc/ld.so.cache"),
                &ca_bundle,
            ),
        );
        Ok(Plan {
            claude,
            extra_ca,
            tools,
            libraries,
            busybox_applets: linked,
            ca_bundle,
            bytes,
            dockerfile,
            entries,
        })
    }

    /// The generated Dockerfile.
    pub fn dockerfile(&self) -> &str {
        &self.dockerfile
    }
}

/// Say what the image is made from, before anything is collected.
fn announce(claude: &ClaudeBinary, extra_ca: Option<&ExtraCa>, progress: &dyn ImageProgress) {
    note(
        progress,
        format!(
            "Claude Code {} ({}) at {}",
            claude.version,
            HumanBytes(claude.size),
            claude.file.display()
        ),
    );
    if let Some(ca) = extra_ca {
        note(
            progress,
            format!(
                "extra CA {}: {} -> NODE_EXTRA_CA_CERTS={EXTRA_CA_PATH}",
                ca.path.display(),
                ca.subjects.join("; ")
            ),
        );
        for s in &ca.expired {
            note(progress, format!("warning: the extra CA `{s}` has expired"));
        }
    }
}

/// The host's shells, and its busybox with the applets it lists (when it
/// has one that lists any).
async fn host_tools(progress: &dyn ImageProgress) -> Result<(Vec<HostTool>, Vec<String>), NativeError> {
    let mut tools = vec![
        HostTool {
            image_path: "/bin/sh".into(),
            host: host_tool(Path::new("/bin/sh"), "a POSIX shell at /bin/sh")?,
        },
        HostTool {
            image_path: "/bin/bash".into(),
            host: host_tool(&find_bash()?, "bash")?,
        },
    ];
    let busybox = HOST_BUSYBOX.iter().map(Path::new).find(|p| p.is_file());
    let mut applets = Vec::new();
    if let Some(bb) = busybox {
        let host = host_tool(bb, "busybox")?;
        applets = busybox_applets(&host).await;
        if applets.is_empty() {
            note(progress, format!("{} lists no applets; leaving it out", host.display()));
        } else {
            tools.push(HostTool {
                image_path: "/bin/busybox".into(),
                host,
            });
        }
    } else {
        note(
            progress,
            "no busybox on this host (Debian: `apt-get install busybox-static`): the image gets no coreutils, grep or sed",
        );
    }
    Ok((tools, applets))
}

/// Whatever the host's loader resolves for Claude Code and each tool.
async fn libraries(claude: &ClaudeBinary, tools: &[HostTool]) -> Result<Vec<PathBuf>, NativeError> {
    let mut libraries: Vec<PathBuf> = Vec::new();
    for file in std::iter::once(&claude.file).chain(tools.iter().map(|t| &t.host)) {
        let elf = if *file == claude.file {
            claude.elf.clone()
        } else {
            match read_elf(file) {
                Ok(Kind::Elf(e)) => e,
                _ => {
                    return Err(NativeError::Host(format!(
                        "{} is not an ELF executable",
                        file.display()
                    )))
                }
            }
        };
        if let Some(interp) = &elf.interp {
            for lib in loader_list(interp, file).await? {
                if !libraries.contains(&lib) {
                    libraries.push(lib);
                }
            }
        }
    }
    Ok(libraries)
}

/// The first non-empty CA bundle of those distributions name.
fn host_ca_bundle() -> Result<PathBuf, NativeError> {
    HOST_CA_BUNDLES
        .iter()
        .map(PathBuf::from)
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() > 0))
        .ok_or_else(|| {
            NativeError::Host(format!(
                "no CA bundle on this host (looked for {}); install `ca-certificates`",
                HOST_CA_BUNDLES.join(", ")
            ))
        })
}

/// The line that says what was collected.
fn collected(tools: &[HostTool], linked: usize, libraries: &[PathBuf], loader_cache: bool, ca_bundle: &Path) -> String {
    format!(
        "collected: {} ({}), {} shared librar{}, {}, CA bundle {}",
        tools
            .iter()
            .map(|t| format!("{} from {}", t.image_path, t.host.display()))
            .collect::<Vec<_>>()
            .join(", "),
        if linked > 0 {
            format!("{linked} busybox applets")
        } else {
            "no busybox applets".into()
        },
        libraries.len(),
        if libraries.len() == 1 { "y" } else { "ies" },
        if loader_cache {
            "the loader cache"
        } else {
            "no loader cache"
        },
        ca_bundle.display(),
    )
}

/// The context's entries as they are gathered: tar path -> entry. A later
/// entry for the same path replaces an earlier one.
#[derive(Default)]
struct Layout {
    entries: BTreeMap<String, Entry>,
}

impl Layout {
    /// A host file, with its own permission bits.
    fn file(&mut self, name: String, host: &Path, hash: bool) -> Result<(), NativeError> {
        let meta = fs::metadata(host).map_err(|e| NativeError::Host(format!("cannot read {}: {e}", host.display())))?;
        // Nobody but root may change them, and no set-id bit survives.
        let mode = meta.permissions().mode() & 0o755;
        let source = Source::File {
            host: host.to_path_buf(),
            size: meta.len(),
            hash,
        };
        self.entries.insert(name, Entry { source, mode });
        Ok(())
    }

    fn bytes(&mut self, name: String, b: Vec<u8>, mode: u32) {
        let source = Source::Bytes(b);
        self.entries.insert(name, Entry { source, mode });
    }

    fn dir(&mut self, name: &str, mode: u32) {
        self.entries.insert(name.to_string(), dir(mode));
    }

    /// The tools, their libraries, the CA bundle and the loader's cache,
    /// from the host, at their paths in the image.
    fn host_files(&mut self, tools: &[HostTool], libraries: &[PathBuf], ca_bundle: &Path) -> Result<(), NativeError> {
        for t in tools {
            self.file(format!("rootfs{}", t.image_path), &t.host, false)?;
        }
        for lib in libraries {
            let host =
                fs::canonicalize(lib).map_err(|e| NativeError::Host(format!("cannot read {}: {e}", lib.display())))?;
            self.file(format!("rootfs{}", lib.display()), &host, false)?;
        }
        self.file(
            format!("rootfs{CA_BUNDLE_PATH}"),
            &fs::canonicalize(ca_bundle).unwrap_or(ca_bundle.to_path_buf()),
            false,
        )?;
        if Path::new("/etc/ld.so.cache").is_file() {
            self.file("rootfs/etc/ld.so.cache".into(), Path::new("/etc/ld.so.cache"), false)?;
        }
        Ok(())
    }

    /// A link to busybox for each applet the tools do not already ship;
    /// returns how many.
    fn applet_links(&mut self, tools: &[HostTool], applets: &[String]) -> usize {
        let shipped: Vec<&str> = tools.iter().filter_map(|t| t.image_path.rsplit('/').next()).collect();
        let mut linked = 0;
        for a in applets {
            if !shipped.contains(&a.as_str()) && a != "claude" {
                self.entries.insert(
                    format!("rootfs/usr/bin/{a}"),
                    Entry {
                        source: Source::Symlink("/bin/busybox".into()),
                        mode: 0o777,
                    },
                );
                linked += 1;
            }
        }
        linked
    }

    /// What this binary writes: the entrypoint, the job user's passwd and
    /// group, the name service config, the extra CA, and the empty
    /// directories.
    fn written_files(&mut self, profile: &Profile, uid: u32, gid: u32, extra_ca: Option<&ExtraCa>) {
        self.bytes(
            "rootfs/usr/local/bin/entrypoint.sh".into(),
            EMBEDDED_ENTRYPOINT.to_vec(),
            0o755,
        );
        let home = profile.home.trim_end_matches('/');
        self.bytes(
            "rootfs/etc/passwd".into(),
            format!("root:x:0:0:root:/root:/bin/sh\nclaude:x:{uid}:{gid}:Claude Code:{home}:/bin/bash\n").into_bytes(),
            0o644,
        );
        self.bytes(
            "rootfs/etc/group".into(),
            format!("root:x:0:\nclaude:x:{gid}:\n").into_bytes(),
            0o644,
        );
        self.bytes(
            "rootfs/etc/nsswitch.conf".into(),
            b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n".to_vec(),
            0o644,
        );
        if let Some(ca) = extra_ca {
            self.bytes(format!("rootfs{EXTRA_CA_PATH}"), ca.pem.clone().into_bytes(), 0o644);
        }
        self.dir("rootfs/tmp", 0o1777);
        self.dir("rootfs/home", 0o755);
        self.dir("home", 0o755);
        self.dir("workspace", 0o755);
    }

    /// The entries with every parent directory, explicitly.
    fn with_parents(mut self) -> BTreeMap<String, Entry> {
        let parents: Vec<String> = self
            .entries
            .keys()
            .flat_map(|k| {
                let mut p = Vec::new();
                let mut rest = k.as_str();
                while let Some((parent, _)) = rest.rsplit_once('/') {
                    p.push(parent.to_string());
                    rest = parent;
                }
                p
            })
            .collect();
        for p in parents {
            self.entries.entry(p).or_insert_with(|| dir(0o755));
        }
        self.entries
    }
}

fn dir(mode: u32) -> Entry {
    Entry {
        source: Source::Dir,
        mode,
    }
}

/// `10001:10001` -> (10001, 10001); the image needs numbers for passwd.
fn numeric_user(user: &str) -> Result<(u32, u32), NativeError> {
    let (u, g) = user.split_once(':').unwrap_or((user, user));
    match (u.parse(), g.parse()) {
        (Ok(u), Ok(g)) => Ok((u, g)),
        _ => Err(NativeError::Host(format!(
            "security-config.json container.user `{user}` is not numeric uid:gid"
        ))),
    }
}

/// A host binary, symlinks resolved, that must be an ELF for this machine.
fn host_tool(path: &Path, what: &str) -> Result<PathBuf, NativeError> {
    let file = fs::canonicalize(path)
        .map_err(|e| NativeError::Host(format!("this host has no {what} ({}: {e})", path.display())))?;
    match read_elf(&file) {
        Ok(Kind::Elf(e)) => e
            .check_machine(&file)
            .map(|()| file)
            .map_err(|e| NativeError::Host(format!("{what}: {e}"))),
        Ok(_) => Err(NativeError::Host(format!(
            "{what} ({}) is not an ELF executable",
            file.display()
        ))),
        Err(e) => Err(NativeError::Host(format!(
            "cannot read {what} ({}): {e}",
            file.display()
        ))),
    }
}

fn find_bash() -> Result<PathBuf, NativeError> {
    ["/bin/bash", "/usr/bin/bash"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| which("bash"))
        .ok_or_else(|| {
            NativeError::Host("this host has no bash (Claude Code's Bash tool needs it); install `bash`".into())
        })
}

async fn run_tool(program: &Path, args: &[&std::ffi::OsStr]) -> io::Result<std::process::Output> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // The container has neither: resolve as it will.
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("LD_PRELOAD");
    match tokio::time::timeout(TOOL_TIMEOUT, cmd.output()).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no answer")),
    }
}

async fn busybox_applets(busybox: &Path) -> Vec<String> {
    let Ok(out) = run_tool(busybox, &["--list".as_ref()]).await else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b"[]_.-".contains(&b)))
        .map(str::to_string)
        .collect()
}

/// The loader's own answer to "what would you load for `file`" (what
/// `ldd` prints): every shared object and the loader itself.
async fn loader_list(interp: &Path, file: &Path) -> Result<Vec<PathBuf>, NativeError> {
    let host = |why: String| NativeError::Host(format!("cannot list the libraries of {}: {why}", file.display()));
    let out = run_tool(interp, &["--list".as_ref(), file.as_os_str()])
        .await
        .map_err(|e| host(format!("{} --list: {e}", interp.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (libs, missing) = parse_loader_list(&text);
    if !missing.is_empty() {
        return Err(host(format!("the host lacks {}", missing.join(", "))));
    }
    if !out.status.success() || libs.is_empty() {
        return Err(host(format!(
            "`{} --list` said: {}",
            interp.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(libs)
}

/// `(paths, names not found)` from the loader's `--list` output:
///
/// ```text
///         linux-vdso.so.1 (0x00007ffd...)
///         libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f...)
///         /lib64/ld-linux-x86-64.so.2 (0x00007f...)
///         libfoo.so.1 => not found
/// ```
fn parse_loader_list(text: &str) -> (Vec<PathBuf>, Vec<String>) {
    let (mut libs, mut missing) = (Vec::new(), Vec::new());
    for line in text.lines().map(str::trim) {
        let (name, target) = match line.split_once(" => ") {
            Some((n, t)) => (n, t),
            None => (line, line),
        };
        if target.trim() == "not found" {
            missing.push(name.to_string());
            continue;
        }
        let path = target.split(" (0x").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    (libs, missing)
}

fn dockerfile(profile: &Profile, uid: u32, gid: u32, version: &str, extra_ca: bool) -> String {
    let home = profile.home.trim_end_matches('/');
    let mut env: Vec<String> = RUNNER_ENV.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    env.push(format!("HOME=\"{home}\""));
    if extra_ca {
        env.push(format!("NODE_EXTRA_CA_CERTS=\"{EXTRA_CA_PATH}\""));
    }
    format!(
        "# The claude-max-market runner image, from the native Claude Code of this\n\
         # host (`claude-max-market docker build --claude-binary`). Every step copies\n\
         # files or sets metadata: nothing runs while it builds.\n\
         FROM scratch\n\
         COPY claude /usr/local/bin/claude\n\
         COPY rootfs/ /\n\
         COPY --chown={uid}:{gid} home/ {home}/\n\
         COPY --chown={uid}:{gid} workspace/ /workspace/\n\
         ENV {}\n\
         LABEL {VERSION_LABEL}=\"{version}\"\n\
         USER {}\n\
         WORKDIR {home}\n\
         ENTRYPOINT [\"/usr/local/bin/entrypoint.sh\"]\n\
         CMD [\"sonnet\"]\n",
        env.join(" \\\n    "),
        profile.user,
    )
}

/// The exact size of the tar the entries make (GNU headers, long names
/// as extra entries, two zero blocks at the end).
fn tar_size(entries: &BTreeMap<String, Entry>) -> u64 {
    let pad = |n: u64| n.div_ceil(512) * 512;
    let long = |s: &str| if s.len() > 99 { 512 + pad(s.len() as u64 + 1) } else { 0 };
    entries
        .iter()
        .map(|(name, e)| {
            let link = match &e.source {
                Source::Symlink(t) => long(t),
                _ => 0,
            };
            // Directories are named with a trailing slash.
            let name_len = if matches!(e.source, Source::Dir) {
                name.len() + 1
            } else {
                name.len()
            };
            512 + pad(e.size())
                + if name_len > 99 {
                    512 + pad(name_len as u64 + 1)
                } else {
                    0
                }
                + link
        })
        .sum::<u64>()
        + 1024
}

// ---------------------------------------------------------------------------
// Building

/// What a native build made.
#[derive(Debug, Clone)]
pub struct NativeImage {
    pub id: String,
    /// Bytes of context the engine read.
    pub bytes: u64,
    /// SHA-256 of the Claude Code binary, as sent.
    pub claude_sha256: String,
    pub steps: usize,
    /// Steps the engine answered from its build cache.
    pub cached: usize,
}

/// Stream `plan` to the engine and build it as `tag`.
pub async fn build(
    docker: &Docker,
    plan: &Plan,
    tag: &str,
    no_cache: bool,
    label: &str,
    progress: &dyn ImageProgress,
) -> Result<NativeImage, DockerError> {
    note(
        progress,
        format!("sending {} to the Docker engine", HumanBytes(plan.bytes)),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Vec<u8>>>(8);
    let (sent_tx, sent_rx) = tokio::sync::watch::channel(0u64);
    let entries = plan.entries.clone();
    let writer = tokio::task::spawn_blocking(move || write_tar(entries, tx));
    let body = futures_util::stream::unfold((rx, sent_tx, 0u64), |(mut rx, sent_tx, n)| async move {
        let chunk = rx.recv().await?;
        let n = n + chunk.as_ref().map_or(0, |c| c.len() as u64);
        sent_tx.send_replace(n);
        Some((chunk.map(Into::into), (rx, sent_tx, n)))
    });
    let options = BuildImageOptions {
        t: Some(tag.to_string()),
        nocache: no_cache,
        rm: true,
        forcerm: true,
        labels: Some(std::collections::HashMap::from([(
            label.to_string(),
            "true".to_string(),
        )])),
        ..Default::default()
    };
    let upload = Upload {
        sent: sent_rx,
        total: plan.bytes,
    };
    let docker = docker.clone().with_timeout(LONG_REQUEST);
    let stream = docker.build_image(options, None, Some(bollard::body_try_stream(body)));
    let built = run_build(&docker, tag, stream, Some(upload), progress).await;
    let written = writer.await.unwrap_or_else(|e| {
        Err(TarError::Read(
            "<build context>".into(),
            io::Error::other(e.to_string()),
        ))
    });
    match (built, written) {
        // A file that could not be read explains a failed upload best.
        (_, Err(TarError::Read(path, source))) => Err(DockerError::Context { path, source }),
        (Err(e), _) => Err(e),
        (Ok(_), Err(TarError::Closed)) => Err(DockerError::Build {
            step: None,
            message: "the engine stopped reading the build context".into(),
            output: Vec::new(),
        }),
        (Ok(b), Ok(w)) => Ok(NativeImage {
            id: b.id,
            bytes: w.bytes,
            claude_sha256: w.claude_sha256,
            steps: b.steps,
            cached: b.cached,
        }),
    }
}

#[derive(Debug)]
enum TarError {
    /// A file of ours could not be read.
    Read(PathBuf, io::Error),
    /// The engine side went away.
    Closed,
}

impl From<io::Error> for TarError {
    fn from(e: io::Error) -> Self {
        TarError::Read("<build context>".into(), e)
    }
}

struct Written {
    bytes: u64,
    claude_sha256: String,
}

/// Chunks of the tar, into the channel the request body reads.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    total: u64,
    closed: bool,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.total += chunk.len() as u64;
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            self.closed = true;
            io::Error::new(io::ErrorKind::BrokenPipe, "the engine stopped reading")
        })
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads a file, hashing what it reads and counting it.
struct Tee<'a> {
    inner: io::Take<File>,
    hash: Option<&'a mut Sha256>,
    read: u64,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.hash.as_mut() {
            h.update(&buf[..n]);
        }
        self.read += n as u64;
        Ok(n)
    }
}

fn write_tar(
    entries: BTreeMap<String, Entry>,
    tx: tokio::sync::mpsc::Sender<io::Result<Vec<u8>>>,
) -> Result<Written, TarError> {
    let mut w = ChunkWriter {
        tx,
        buf: Vec::with_capacity(CHUNK),
        total: 0,
        closed: false,
    };
    let mut claude = Sha256::new();
    let result = (|| {
        let mut b = tar::Builder::new(&mut w);
        for (name, e) in &entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(e.mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match &e.source {
                Source::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{name}/"), io::empty())?;
                }
                Source::Bytes(bytes) => {
                    h.set_size(bytes.len() as u64);
                    b.append_data(&mut h, name, &bytes[..])?;
                }
                Source::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, name, target)?;
                }
                Source::File { host, size, hash } => {
                    let read = |e: io::Error| TarError::Read(host.clone(), e);
                    let f = File::open(host).map_err(read)?;
                    h.set_size(*size);
                    let mut tee = Tee {
                        inner: f.take(*size),
                        hash: hash.then_some(&mut claude),
                        read: 0,
                    };
                    b.append_data(&mut h, name, &mut tee).map_err(read)?;
                    if tee.read != *size {
                        return Err(read(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("it changed while being sent ({} of {size} bytes)", tee.read),
                        )));
                    }
                }
            }
        }
        b.finish()?;
        Ok(())
    })();
    let result = result.and_then(|()| w.send().map_err(TarError::from));
    match result {
        Err(_) if w.closed => Err(TarError::Closed),
        Err(e) => {
            // Make the request fail rather than end as if complete.
            let _ =
                w.tx.blocking_send(Err(io::Error::other("the build context could not be read")));
            Err(e)
        }
        Ok(()) => Ok(Written {
            bytes: w.total,
            claude_sha256: hex::encode(claude.finalize()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_what_claude_prints() {
        assert_eq!(parse_version("2.1.332 (Claude Code)\n").as_deref(), Some("2.1.332"));
        assert_eq!(parse_version("\n 2.0.37 (Claude Code) \n").as_deref(), Some("2.0.37"));
        assert_eq!(
            parse_version("1.2.3-beta.1 (Claude Code)").as_deref(),
            Some("1.2.3-beta.1")
        );
        assert_eq!(parse_version("2.1.332"), None);
        assert_eq!(parse_version("GNU bash, version 5.2.15 (Claude Code)"), None);
        assert_eq!(parse_version("v2 (Claude Code)"), None);
        assert_eq!(parse_version("2.1.332 (Claude Code); rm -rf /"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn elf_headers_tell_machine_interpreter_and_scripts() {
        let me = read_elf(&fs::read_link("/proc/self/exe").unwrap()).unwrap();
        let Kind::Elf(e) = me else { panic!("{me:?}") };
        assert!(e.check_machine(Path::new("x")).is_ok());
        assert!(
            e.interp.as_ref().is_some_and(|i| i.to_string_lossy().contains("ld-")),
            "{e:?}"
        );
        assert_eq!(
            parse_elf(b"#!/usr/bin/env node\nconsole.log(1)", |_, _| Ok(())).unwrap(),
            Kind::Script("#!/usr/bin/env node".into())
        );
        assert_eq!(parse_elf(b"hello", |_, _| Ok(())).unwrap(), Kind::Other);
        // A 64-bit little-endian AArch64 header names its machine.
        let mut h = [0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18..20].copy_from_slice(&183u16.to_le_bytes());
        let Kind::Elf(arm) = parse_elf(&h, |_, _| Ok(())).unwrap() else {
            panic!()
        };
        assert_eq!(machine_name(arm.class, arm.machine), "AArch64");
        assert_eq!(arm.interp, None);
    }

    #[test]
    fn the_loader_list_gives_paths_and_names_what_is_missing() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd5e1f2000)\n\
                    \tlibtinfo.so.6 => /lib/x86_64-linux-gnu/libtinfo.so.6 (0x00007f5fb23a6000)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f5fb252c000)\n\
                    \tlibfoo.so.1 => not found\n";
        let (libs, missing) = parse_loader_list(text);
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libtinfo.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert_eq!(missing, ["libfoo.so.1"]);
    }

    #[test]
    fn pem_blocks_are_split_and_text_between_them_dropped() {
        let text = "subject=CN=x\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\nnoise\n-----BEGIN PRIVATE KEY-----\nBBBB\n-----END PRIVATE KEY-----\n";
        let b = pem_blocks(text).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].0, "CERTIFICATE");
        assert_eq!(b[0].1, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----");
        assert_eq!(b[1].0, "PRIVATE KEY");
        assert!(pem_blocks("-----BEGIN CERTIFICATE-----\nAAAA\n").is_err());
        assert!(pem_blocks("-----BEGIN CERTIFICATE-----\nAAAA\n-----END X509 CRL-----\n").is_err());
    }

    #[test]
    fn the_tar_size_is_exact() {
        let mut entries = BTreeMap::new();
        entries.insert(
            "Dockerfile".to_string(),
            Entry {
                source: Source::Bytes(b"FROM scratch\n".to_vec()),
                mode: 0o644,
            },
        );
        entries.insert(
            "rootfs".to_string(),
            Entry {
                source: Source::Dir,
                mode: 0o755,
            },
        );
        entries.insert(
            format!("rootfs/{}", "l".repeat(120)),
            Entry {
                source: Source::Symlink(format!("/{}", "t".repeat(150))),
                mode: 0o777,
            },
        );
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let expected = tar_size(&entries);
        let written = std::thread::spawn(move || write_tar(entries, tx).map(|w| w.bytes).map_err(|_| ()));
        let mut got = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            got += chunk.unwrap().len() as u64;
        }
        assert_eq!(written.join().unwrap().unwrap(), got);
        assert_eq!(got, expected);
    }

    #[test]
    fn the_dockerfile_only_copies_and_sets_metadata() {
        let p = super::super::profile::container().unwrap();
        let d = dockerfile(p, 10001, 10001, "2.1.332", true);
        let steps: Vec<&str> = d
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with(' ') && !l.is_empty())
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(
            steps
                .iter()
                .all(|s| ["FROM", "COPY", "ENV", "LABEL", "USER", "WORKDIR", "ENTRYPOINT", "CMD"].contains(s)),
            "{steps:?}"
        );
        assert!(d.contains("FROM scratch\n"));
        assert!(d.contains(&format!("USER {}\n", p.user)));
        assert!(d.contains(&format!("{VERSION_LABEL}=\"2.1.332\"")));
        assert!(d.contains(&format!("NODE_EXTRA_CA_CERTS=\"{EXTRA_CA_PATH}\"")));
        assert!(!dockerfile(p, 10001, 10001, "2.1.332", false).contains("NODE_EXTRA_CA_CERTS"));
    }
}
