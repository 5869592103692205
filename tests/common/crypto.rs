//! The crypto part of the harness, for the `keys` / `encrypt` / `decrypt`
//! tests: a few identities generated once per test binary, peers introduced
//! to each other, the binary run with raw bytes on stdin and stdout, and the
//! envelope layout of docs/FORMAT.md read independently of the library.
//!
//! It must not call the library's envelope code: the layout here is the
//! second reading of the format that the tests compare against.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::OnceLock;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::{Digest, Sha256};

use crate::common::{Cmm, Run};

/// Plaintext bytes per chunk in envelopes the binary writes.
pub const CHUNK: usize = 65536;
/// AES-GCM tag and Ed25519 signature sizes.
pub const TAG: usize = 16;
pub const SIG: usize = 64;

/// RSA-3072 generation costs seconds; generate each identity once per test
/// binary and copy its whole install (keys and the audit log that recorded
/// them: keys without their log are refused) into every install that
/// needs it.
fn template(n: usize) -> &'static Path {
    static T: [OnceLock<tempfile::TempDir>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    T[n].get_or_init(|| {
        let t = Cmm::new();
        t.run(&["keys", "generate"]).code(0);
        t.home
    })
    .path()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    fs::set_permissions(to, fs::Permissions::from_mode(0o700)).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// An install holding identity number `n` (0, 1 or 2).
pub fn node(n: usize) -> Cmm {
    let t = Cmm::new();
    copy_dir(template(n), t.home.path());
    t
}

pub fn node_id(t: &Cmm) -> String {
    t.run(&["keys", "show", "--json"]).code(0).json()["node_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Make `from`'s public identity known to `to` as `name`.
pub fn introduce(from: &Cmm, to: &Cmm, name: &str) {
    let f = from.file("public.json");
    if !f.exists() {
        from.run(&["keys", "export", "--public", f.to_str().unwrap()]).code(0);
    }
    to.run(&["keys", "import", name, f.to_str().unwrap()]).code(0);
}

/// Run with raw bytes on stdin and stdout (the harness's stdout is text).
pub fn raw(t: &Cmm, args: &[&str], stdin: &[u8]) -> (i32, Vec<u8>, String) {
    raw_run(t.cmd(args), stdin)
}

/// [`raw`] for a command with extra settings (`t.cmd(..).env(..)`).
pub fn raw_run(run: Run, stdin: &[u8]) -> (i32, Vec<u8>, String) {
    let out = run.stdin(stdin).run_bytes();
    (out.status, out.stdout, out.stderr)
}

/// `n` bytes of a recognisable, seed-dependent pattern.
pub fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The names in `dir`, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Where the fields of an envelope are (docs/FORMAT.md), found by reading
/// it as the format describes, not through the library.
#[derive(Debug)]
pub struct Layout {
    pub chunk_size_at: usize,
    pub chunk_size: usize,
    pub nonce_prefix: [u8; 7],
    pub nonce_at: usize,
    pub count_at: usize,
    /// (key id offset, wrapped key offset, wrapped key length) per recipient.
    pub stanzas: Vec<(usize, usize, usize)>,
    pub flag_at: usize,
    pub signed: bool,
    /// Length of everything before the first chunk (the chunks' AAD input).
    pub prefix_len: usize,
    /// End of the chunks (start of the trailer signature when signed).
    pub chunks_end: usize,
}

impl Layout {
    pub fn of(env: &[u8]) -> Layout {
        assert_eq!(&env[..8], b"CMM-ENC\x01");
        let header_len = u32::from_be_bytes(env[8..12].try_into().unwrap()) as usize;
        let mut at = 12;
        let suite_len = env[at] as usize;
        at += 1 + suite_len;
        let chunk_size_at = at;
        let chunk_size = u32::from_be_bytes(env[at..at + 4].try_into().unwrap()) as usize;
        at += 4;
        let nonce_at = at;
        let nonce_prefix = env[at..at + 7].try_into().unwrap();
        at += 7;
        let count_at = at;
        let count = u16::from_be_bytes(env[at..at + 2].try_into().unwrap()) as usize;
        at += 2;
        let mut stanzas = Vec::new();
        for _ in 0..count {
            let key_id_at = at;
            let len = u16::from_be_bytes(env[at + 32..at + 34].try_into().unwrap()) as usize;
            stanzas.push((key_id_at, at + 34, len));
            at += 34 + len;
        }
        let flag_at = at;
        let signed = env[at] == 1;
        at += 1 + if signed { 32 } else { 0 };
        assert_eq!(at, 12 + header_len, "header fields fill header_len");
        let prefix_len = at + if signed { SIG } else { 0 };
        let chunks_end = env.len() - if signed { SIG } else { 0 };
        Layout {
            chunk_size_at,
            chunk_size,
            nonce_prefix,
            nonce_at,
            count_at,
            stanzas,
            flag_at,
            signed,
            prefix_len,
            chunks_end,
        }
    }

    /// Offsets worth hitting: one in every field, the chunk boundaries, the
    /// tags, and the trailer.
    pub fn interesting(&self, len: usize) -> Vec<usize> {
        let ct = self.chunk_size + TAG;
        let mut v = vec![
            0,
            3,
            6,
            7,
            8,
            11,
            12,
            20,
            self.chunk_size_at + 3,
            self.nonce_at,
            self.count_at + 1,
        ];
        for &(key_id, wrapped, wlen) in &self.stanzas {
            v.extend([key_id, key_id + 31, wrapped - 1, wrapped + wlen / 2]);
        }
        v.push(self.flag_at);
        if self.signed {
            v.extend([self.flag_at + 1, self.flag_at + 33, self.prefix_len - 1]);
        }
        // Inside the first two and the last two chunks; the start of the
        // others (their insides are alike).
        let n = (self.chunks_end - self.prefix_len).div_ceil(ct);
        for k in 0..n {
            let c = self.prefix_len + k * ct;
            let end = (c + ct).min(self.chunks_end);
            if k < 2 || k + 2 >= n {
                v.extend([c, (c + end) / 2, end - TAG, end - 1]);
            } else {
                v.push(c);
            }
        }
        if self.signed {
            v.extend([self.chunks_end, len - 1]);
        }
        v.sort();
        v.dedup();
        v.retain(|&o| o < len);
        v
    }
}

/// What any recipient can do with its own private key (the PKCS#8 file in
/// its `keys/` directory): find its stanza and unwrap the file key
/// (RSA-OAEP-SHA256 with the label of docs/FORMAT.md).
pub fn file_key_of(keys: &Path, env: &[u8], layout: &Layout) -> [u8; 32] {
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
    let pem = names_in(keys)
        .into_iter()
        .find(|f| f.ends_with(".encryption.pem"))
        .expect("an RSA private key");
    let rsa_key = rsa::RsaPrivateKey::from_pkcs8_pem(&fs::read_to_string(keys.join(pem)).unwrap()).unwrap();
    let der = rsa_key.to_public_key().to_public_key_der().unwrap();
    let my_id = Sha256::digest(der.as_bytes());
    let &(_, wrapped, wlen) = layout
        .stanzas
        .iter()
        .find(|(key_id, ..)| env[*key_id..*key_id + 32] == my_id[..])
        .expect("a recipient of this envelope");
    let key = rsa_key
        .decrypt(
            rsa::Oaep::new_with_label::<Sha256, _>("cmm-enc v1 file key"),
            &env[wrapped..wrapped + wlen],
        )
        .unwrap();
    key.try_into().unwrap()
}

/// Chunk `i` of docs/FORMAT.md: AES-256-GCM under `key`, nonce
/// `prefix ‖ u32(i) ‖ last`, the header hash as associated data. Returns
/// ciphertext ‖ tag.
pub fn seal_chunk(
    key: &[u8; 32],
    prefix: &[u8; 7],
    i: usize,
    last: bool,
    header_hash: &[u8; 32],
    text: &[u8],
) -> Vec<u8> {
    let cipher = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
    let mut nonce = [0u8; 12];
    nonce[..7].copy_from_slice(prefix);
    nonce[7..11].copy_from_slice(&(i as u32).to_be_bytes());
    nonce[11] = last as u8;
    let mut chunk = text.to_vec();
    let tag = cipher
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(header_hash), &mut chunk)
        .unwrap();
    chunk.extend_from_slice(tag.as_ref());
    chunk
}

/// Re-seal chunk `i` (a full, non-final chunk) with `text` under the file
/// key, exactly as a writer would: same nonce, same associated data.
pub fn reseal_chunk(env: &mut [u8], layout: &Layout, key: &[u8; 32], i: usize, text: &[u8]) {
    assert_eq!(text.len(), layout.chunk_size);
    let header_hash: [u8; 32] = Sha256::digest(&env[..layout.prefix_len]).into();
    let sealed = seal_chunk(key, &layout.nonce_prefix, i, false, &header_hash, text);
    let at = layout.prefix_len + i * (layout.chunk_size + TAG);
    env[at..at + sealed.len()].copy_from_slice(&sealed);
}
