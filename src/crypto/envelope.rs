//! The envelope: a streaming hybrid encryption format (docs/FORMAT.md).
//!
//! ```text
//! "CMM-ENC" 0x01 | u32 header_len | header | [header signature] | chunks | [trailer signature]
//! ```
//!
//! A fresh 256-bit file key seals the payload in AES-256-GCM chunks; each
//! recipient gets the file key wrapped with RSA-OAEP-SHA256. The nonce of
//! chunk `i` is `prefix(7) ‖ i(u32 BE) ‖ last(1)` and every chunk carries the
//! SHA-256 of everything before the first chunk as associated data, so header
//! edits, reordering, truncation and appended chunks all fail authentication.
//!
//! A signed envelope names the sender's Ed25519 key in the header and carries
//! two signatures: one over the header (checked before any RSA private-key
//! operation, see SECURITY.md) and one after the last chunk over the header
//! hash and the SHA-256 of every chunk's ciphertext and tag, so a
//! co-recipient who knows the file key cannot substitute content under the
//! sender's name. (Signing only the tags would not do: whoever knows the
//! file key knows GHASH's key and can find another chunk with the same tag.)
//!
//! That signature, like the final-chunk flag, can only be checked at the
//! end, so a streaming reader produces plaintext it cannot vouch for until
//! then: [`decrypt_stream`]'s output must be held back until it returns `Ok`
//! (`files::decrypt_file` spools it; [`decrypt`] returns nothing on error).
//!
//! Memory is constant: a fixed pool of batch buffers (see `pipeline`),
//! whatever the payload size; batches are sealed and opened in parallel.

use std::io::{self, IoSlice, Read, Write};

use ed25519_dalek::{Signature, VerifyingKey};
use rand::rngs::OsRng;
use rand::{CryptoRng, RngCore};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use rsa::Oaep;
use sha2::{Digest, Sha256};

use super::keys::{node_id_of, rsa_key_id, Identity, KeyError, PublicIdentity};
use super::pipeline::{self, Batch};
use crate::exit::{Exit, HasExit};

/// First bytes of every envelope.
pub const MAGIC: &[u8; 7] = b"CMM-ENC";
/// The format version this build writes and reads.
pub const VERSION: u8 = 1;
/// The one suite of version 1.
pub const SUITE: &str = "rsa3072-oaep-sha256+aes256gcm-stream+ed25519";
/// Smallest and largest chunk sizes a reader accepts.
pub const MIN_CHUNK_SIZE: usize = 16;
pub const MAX_CHUNK_SIZE: usize = 16 << 20;
/// Largest header a reader accepts (32 recipients fit in ~14 KiB).
pub const MAX_HEADER_LEN: usize = 64 << 10;

const TAG_LEN: usize = 16;
/// Chunk counters are 32 bits.
const MAX_CHUNKS: u64 = 1 << 32;
const SIG_LEN: usize = 64;
const KEY_ID_LEN: usize = 32;
const NONCE_PREFIX_LEN: usize = 7;
const OAEP_LABEL: &str = "cmm-enc v1 file key";
const HEADER_SIG_CONTEXT: &[u8] = b"cmm-enc v1 header signature\0";
const TRAILER_SIG_CONTEXT: &[u8] = b"cmm-enc v1 trailer signature\0";

/// Every way opening or sealing an envelope can fail.
///
/// Failures after the RSA unwrap share one message shape (`Damaged`): a bad
/// RSA padding is not reported as such but leads to a random file key, so it
/// is indistinguishable from a damaged first chunk (no padding oracle).
///
/// The line between exit 2 and exit 5 is the magic (docs/FORMAT.md, "What a
/// reader reports"): input that does not start with all of `CMM-ENC` is not
/// an envelope at all (`Empty`, `NotEnvelope`: invalid input, 2); input that
/// does is one of ours, and every way it fails to open is an integrity
/// failure (5), whether it was cut, flipped, forged or sent to someone else.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the input is empty, so it is not an envelope of ours")]
    Empty,
    #[error("the input is not an envelope of ours: it does not start with `CMM-ENC`")]
    NotEnvelope,
    #[error("the envelope says it is version {0}, and this build reads version {VERSION}: it is damaged, or was written by a newer claude-max-market")]
    UnknownVersion(u8),
    #[error("malformed envelope header: {0}")]
    BadHeader(String),
    #[error("the envelope is truncated: {0}")]
    Truncated(String),
    #[error("not encrypted to any of your keys: the envelope is for key id(s) {}", .0.join(", "))]
    NotForMe(Vec<String>),
    #[error("the envelope is not signed, but a signature by {0} is required")]
    Unsigned(String),
    #[error("the envelope is signed by node {found}, not by the required signer {expected}")]
    WrongSigner { expected: String, found: String },
    #[error("the sender's signature does not verify: the envelope was altered or forged")]
    BadSignature,
    #[error("decryption failed at chunk {0}: the envelope is damaged, truncated or was altered")]
    Damaged(u64),
    #[error("no recipients to encrypt to")]
    NoRecipients,
    #[error("too many recipients ({0}; at most {1})")]
    TooManyRecipients(usize, usize),
    #[error("the payload is too large for one envelope")]
    TooLarge,
    #[error("cannot read {}: {source}", path.display())]
    Input {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("{0}")]
    Target(String),
    #[error("{} already exists; not overwriting it", .0.display())]
    Exists(std::path::PathBuf),
    #[error("cannot create a file in {}: {error}", dir.display())]
    OutputDir { dir: std::path::PathBuf, error: io::Error },
    #[error("cannot hold the decrypted output in {} until it verifies: {source}", dir.display())]
    Spool { dir: std::path::PathBuf, source: io::Error },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl HasExit for CryptoError {
    fn exit(&self) -> Exit {
        match self {
            CryptoError::Empty
            | CryptoError::NotEnvelope
            | CryptoError::NoRecipients
            | CryptoError::TooManyRecipients(..)
            | CryptoError::Input { .. }
            | CryptoError::Target(_)
            | CryptoError::Exists(_)
            | CryptoError::OutputDir { .. } => Exit::Usage,
            CryptoError::UnknownVersion(_)
            | CryptoError::BadHeader(_)
            | CryptoError::Truncated(_)
            | CryptoError::NotForMe(_)
            | CryptoError::Unsigned(_)
            | CryptoError::WrongSigner { .. }
            | CryptoError::BadSignature
            | CryptoError::Damaged(_) => Exit::Integrity,
            CryptoError::TooLarge | CryptoError::Spool { .. } | CryptoError::Io(_) => Exit::Failed,
            CryptoError::Key(e) => e.exit(),
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            CryptoError::Empty | CryptoError::NotEnvelope => {
                Some("pass a file made by `claude-max-market encrypt`".into())
            }
            CryptoError::UnknownVersion(_) => Some(
                "if a newer claude-max-market wrote it, upgrade to read it; otherwise obtain a fresh copy from the sender".into(),
            ),
            CryptoError::NotForMe(_) => Some(
                "ask the sender to encrypt to your identity (`claude-max-market keys show`); retired keys past `security.keyRotationDays` are gone".into(),
            ),
            CryptoError::Unsigned(_) | CryptoError::WrongSigner { .. } | CryptoError::BadSignature => {
                Some("do not trust this file; ask the sender to re-send it signed (`encrypt --sign`)".into())
            }
            CryptoError::BadHeader(_) | CryptoError::Truncated(_) | CryptoError::Damaged(_) => {
                Some("the file was corrupted or tampered with; obtain a fresh copy from the sender".into())
            }
            CryptoError::NoRecipients => Some("name a recipient with `--recipient NAME`".into()),
            CryptoError::Target(_) => Some("choose another `--output` (`-` for stdout)".into()),
            CryptoError::Exists(_) => Some("pass `--force` to replace it, or choose another `--output`".into()),
            CryptoError::OutputDir { .. } => Some(
                "the output goes next to its final name, so that directory must be writable by you: choose an `--output` in a directory you can write to (`-` for stdout)".into(),
            ),
            CryptoError::Spool { .. } => Some(
                "stdout gets the plaintext only after every chunk verified, so it is held in `$TMPDIR` first and needs that much free space there; set `TMPDIR` to a directory with room, or decrypt with `--output FILE`".into(),
            ),
            CryptoError::Key(e) => e.hint(),
            _ => None,
        }
    }
}

/// A decrypted in-memory payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub plaintext: Vec<u8>,
    /// Node id of the verified sender, if the envelope was signed.
    pub signer: Option<String>,
}

/// What a streaming decryption found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReport {
    /// Node id of the verified sender, if the envelope was signed.
    pub signer: Option<String>,
    /// Plaintext bytes written.
    pub bytes: u64,
}

/// One recipient entry of the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stanza {
    pub key_id: [u8; KEY_ID_LEN],
    pub wrapped: Vec<u8>,
}

/// The parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub chunk_size: usize,
    pub nonce_prefix: [u8; NONCE_PREFIX_LEN],
    pub recipients: Vec<Stanza>,
    /// The sender's Ed25519 public key, when signed.
    pub sender: Option<[u8; 32]>,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.recipients.len() * 420);
        b.push(SUITE.len() as u8);
        b.extend_from_slice(SUITE.as_bytes());
        b.extend_from_slice(&(self.chunk_size as u32).to_be_bytes());
        b.extend_from_slice(&self.nonce_prefix);
        b.extend_from_slice(&(self.recipients.len() as u16).to_be_bytes());
        for s in &self.recipients {
            b.extend_from_slice(&s.key_id);
            b.extend_from_slice(&(s.wrapped.len() as u16).to_be_bytes());
            b.extend_from_slice(&s.wrapped);
        }
        match &self.sender {
            Some(pk) => {
                b.push(1);
                b.extend_from_slice(pk);
            }
            None => b.push(0),
        }
        b
    }

    fn decode(body: &[u8]) -> Result<Header, CryptoError> {
        let mut c = Cursor { b: body, at: 0 };
        let suite_len = c.u8()? as usize;
        if c.take(suite_len)? != SUITE.as_bytes() {
            return Err(CryptoError::BadHeader("unknown suite".into()));
        }
        let chunk_size = c.u32()? as usize;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(CryptoError::BadHeader(format!("chunk size {chunk_size} out of range")));
        }
        let nonce_prefix = c.array::<NONCE_PREFIX_LEN>()?;
        let n = c.u16()? as usize;
        let max = super::params().max_recipients;
        if n == 0 || n > max {
            return Err(CryptoError::BadHeader(format!("{n} recipients (want 1 to {max})")));
        }
        let mut recipients = Vec::with_capacity(n);
        for _ in 0..n {
            let key_id = c.array::<KEY_ID_LEN>()?;
            let len = c.u16()? as usize;
            if !(256..=1024).contains(&len) {
                return Err(CryptoError::BadHeader(format!("wrapped key of {len} bytes")));
            }
            recipients.push(Stanza {
                key_id,
                wrapped: c.take(len)?.to_vec(),
            });
        }
        let sender = match c.u8()? {
            0 => None,
            1 => Some(c.array::<32>()?),
            f => return Err(CryptoError::BadHeader(format!("sender flag {f}"))),
        };
        if c.at != body.len() {
            return Err(CryptoError::BadHeader(
                "unexpected bytes after the header fields".into(),
            ));
        }
        Ok(Header {
            chunk_size,
            nonce_prefix,
            recipients,
            sender,
        })
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CryptoError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| CryptoError::BadHeader("fields run past the header length".into()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], CryptoError> {
        // `take(N)` returned exactly N bytes.
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Result<u8, CryptoError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, CryptoError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, CryptoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
}

/// Everything before the first chunk, parsed.
#[derive(Debug, Clone)]
pub struct Prefix {
    pub header: Header,
    /// The bytes covered by the header signature (magic through header).
    signed: Vec<u8>,
    header_sig: Option<[u8; SIG_LEN]>,
    /// SHA-256 of every byte before the first chunk: the chunks' AAD.
    pub header_hash: [u8; 32],
}

impl Prefix {
    fn len(&self) -> usize {
        self.signed.len() + self.header_sig.map_or(0, |_| SIG_LEN)
    }

    /// Hex node id of the sender, if signed.
    pub fn signer(&self) -> Option<String> {
        self.header
            .sender
            .and_then(|pk| VerifyingKey::from_bytes(&pk).ok())
            .map(|vk| node_id_of(&vk))
    }
}

/// Read until `buf` is full or the input ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn read_exact_or_truncated<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> Result<(), CryptoError> {
    if read_full(r, buf)? < buf.len() {
        return Err(CryptoError::Truncated(format!("it ends inside the {what}")));
    }
    Ok(())
}

/// Parse magic, version and header (and header signature) from a stream.
/// No key is used; this is the part the fuzz target exercises first.
pub fn read_prefix<R: Read>(r: &mut R) -> Result<Prefix, CryptoError> {
    let mut start = [0u8; 8];
    let n = read_full(r, &mut start)?;
    if n == 0 {
        return Err(CryptoError::Empty);
    }
    // Fewer than 7 bytes cannot be told from any other short input, so only
    // the whole magic makes the input one of ours (and its failures exit 5).
    if n < MAGIC.len() || start[..MAGIC.len()] != MAGIC[..] {
        return Err(CryptoError::NotEnvelope);
    }
    if n < start.len() {
        return Err(CryptoError::Truncated("it ends right after the magic bytes".into()));
    }
    if start[7] != VERSION {
        return Err(CryptoError::UnknownVersion(start[7]));
    }
    let mut len = [0u8; 4];
    read_exact_or_truncated(r, &mut len, "header")?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HEADER_LEN {
        return Err(CryptoError::BadHeader(format!(
            "header length {len} exceeds {MAX_HEADER_LEN}"
        )));
    }
    let mut signed = Vec::with_capacity(12 + len);
    signed.extend_from_slice(&start);
    signed.extend_from_slice(&(len as u32).to_be_bytes());
    signed.resize(12 + len, 0);
    read_exact_or_truncated(r, &mut signed[12..], "header")?;
    let header = Header::decode(&signed[12..])?;
    let header_sig = match header.sender {
        Some(_) => {
            let mut s = [0u8; SIG_LEN];
            read_exact_or_truncated(r, &mut s, "header signature")?;
            Some(s)
        }
        None => None,
    };
    let mut h = Sha256::new();
    h.update(&signed);
    if let Some(s) = &header_sig {
        h.update(s);
    }
    Ok(Prefix {
        header,
        signed,
        header_sig,
        header_hash: h.finalize().into(),
    })
}

fn nonce(prefix: &[u8; NONCE_PREFIX_LEN], counter: u32, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..7].copy_from_slice(prefix);
    n[7..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = last as u8;
    n
}

/// The chunk AEAD: AES-256-GCM, 12-byte nonce, 16-byte tag, the header hash
/// as associated data. `ring` does the bulk work rather than RustCrypto's
/// `aes-gcm`: same algorithm and the same bytes (the FORMAT.md vector pins
/// them), but its GHASH uses carry-less multiply over many blocks at once
/// where `polyval` does one block at a time, which made GHASH a third or more
/// of encryption time. Keys, signatures and hashes stay on RustCrypto.
struct ChunkCipher(LessSafeKey);

impl ChunkCipher {
    fn new(file_key: &[u8; 32]) -> ChunkCipher {
        let key = UnboundKey::new(&AES_256_GCM, file_key).expect("AES-256-GCM takes a 32-byte key");
        ChunkCipher(LessSafeKey::new(key))
    }

    /// Encrypt `data` in place and return its tag.
    fn seal(&self, nonce: [u8; 12], aad: &[u8; 32], data: &mut [u8]) -> Result<[u8; TAG_LEN], CryptoError> {
        // Only fails beyond GCM's 64 GiB message limit; chunks are <= 16 MiB.
        let tag = self
            .0
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), data)
            .map_err(|_| CryptoError::TooLarge)?;
        Ok(tag.as_ref().try_into().expect("GCM tags are 16 bytes"))
    }

    /// Decrypt `data` in place if `tag` authenticates it. On failure `data`
    /// is left overwritten (not restored to the ciphertext).
    fn open(&self, nonce: [u8; 12], aad: &[u8; 32], data: &mut [u8], tag: [u8; TAG_LEN]) -> bool {
        self.0
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                Tag::from(tag),
                data,
                0..,
            )
            .is_ok()
    }
}

fn header_sig_message(signed: &[u8]) -> Vec<u8> {
    [HEADER_SIG_CONTEXT, signed].concat()
}

fn trailer_sig_message(header_hash: &[u8; 32], chunks_hash: &[u8]) -> Vec<u8> {
    [TRAILER_SIG_CONTEXT, header_hash, chunks_hash].concat()
}

fn verify_sig(pk: &[u8; 32], msg: &[u8], sig: &[u8; SIG_LEN]) -> Result<(), CryptoError> {
    let vk = VerifyingKey::from_bytes(pk).map_err(|_| CryptoError::BadSignature)?;
    vk.verify_strict(msg, &Signature::from_bytes(sig))
        .map_err(|_| CryptoError::BadSignature)
}

/// Knobs for sealing; the defaults come from `security-config.json`, tests
/// pin the randomness to produce the documented test vector.
pub(crate) struct SealParams<'r, R: RngCore + CryptoRng> {
    pub chunk_size: usize,
    pub file_key: [u8; 32],
    pub nonce_prefix: [u8; NONCE_PREFIX_LEN],
    pub rng: &'r mut R,
}

/// Encrypt a stream to `recipients`, optionally signed. Returns the
/// plaintext byte count. Memory use is constant, whatever the size.
pub fn encrypt_stream<R: Read, W: Write + Send>(
    recipients: &[PublicIdentity],
    sign_with: Option<&Identity>,
    input: R,
    output: W,
) -> Result<u64, CryptoError> {
    let mut file_key = [0u8; 32];
    let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
    OsRng.fill_bytes(&mut file_key);
    OsRng.fill_bytes(&mut nonce_prefix);
    let params = SealParams {
        chunk_size: super::params().chunk_size,
        file_key,
        nonce_prefix,
        rng: &mut OsRng,
    };
    seal(recipients, sign_with, input, output, params)
}

pub(crate) fn seal<R: Read, W: Write + Send, G: RngCore + CryptoRng>(
    recipients: &[PublicIdentity],
    sign_with: Option<&Identity>,
    mut input: R,
    mut output: W,
    p: SealParams<'_, G>,
) -> Result<u64, CryptoError> {
    if recipients.is_empty() {
        return Err(CryptoError::NoRecipients);
    }
    let max = super::params().max_recipients;
    let mut stanzas: Vec<Stanza> = Vec::with_capacity(recipients.len());
    for r in recipients {
        r.validate()?;
        let key = r.rsa_public()?;
        let key_id = rsa_key_id(&key)?;
        if stanzas.iter().any(|s| s.key_id == key_id) {
            continue;
        }
        let wrapped = key
            .encrypt(&mut *p.rng, Oaep::new_with_label::<Sha256, _>(OAEP_LABEL), &p.file_key)
            .map_err(|e| KeyError::Invalid(format!("RSA-OAEP wrap failed: {e}")))?;
        stanzas.push(Stanza { key_id, wrapped });
    }
    if stanzas.len() > max {
        return Err(CryptoError::TooManyRecipients(stanzas.len(), max));
    }
    let header = Header {
        chunk_size: p.chunk_size,
        nonce_prefix: p.nonce_prefix,
        recipients: stanzas,
        sender: sign_with.map(|id| id.current().public_key_bytes()),
    };
    let body = header.encode();
    let mut prefix = Vec::with_capacity(12 + body.len() + SIG_LEN);
    prefix.extend_from_slice(MAGIC);
    prefix.push(VERSION);
    prefix.extend_from_slice(&(body.len() as u32).to_be_bytes());
    prefix.extend_from_slice(&body);
    if let Some(id) = sign_with {
        let sig = id.sign(&header_sig_message(&prefix));
        prefix.extend_from_slice(&sig.to_bytes());
    }
    let header_hash: [u8; 32] = Sha256::digest(&prefix).into();
    output.write_all(&prefix)?;

    let cipher = ChunkCipher::new(&p.file_key);
    let mut chunks_hash = sign_with.map(|_| Sha256::new());
    let cs = p.chunk_size;
    let per_batch = batch_chunks(cs);
    // A batch buffer holds `per_batch` chunks of plaintext back to back, then
    // the chunks' tags. One read fills it; one vectored write interleaves
    // chunks and tags. Whether a full batch is the last one is only known
    // after reading the next, so one batch is read ahead into `spare`
    // (swapping buffers, not copying): reads stay aligned and unsplit.
    let tags_at = per_batch * cs;
    let buf_len = tags_at + per_batch * TAG_LEN;
    let mut spare = vec![0u8; buf_len];
    let mut ahead: Option<usize> = None;
    let mut counter: u64 = 0;
    let mut total: u64 = 0;
    let produce = |b: &mut Batch| -> Result<(), CryptoError> {
        let got = match ahead {
            Some(n) => n,
            None => read_full(&mut input, &mut spare[..tags_at])?,
        };
        std::mem::swap(&mut b.buf, &mut spare);
        b.last = got < tags_at || {
            let next = read_full(&mut input, &mut spare[..tags_at])?;
            ahead = Some(next);
            next == 0
        };
        b.first = counter;
        let n = got.div_ceil(cs).max(1);
        b.lens.clear();
        b.lens.resize(n - 1, cs);
        b.lens.push(got - (n - 1) * cs);
        counter += n as u64;
        if counter > MAX_CHUNKS {
            return Err(CryptoError::TooLarge);
        }
        total += got as u64;
        Ok(())
    };
    let work = |b: &mut Batch| -> Result<(), CryptoError> {
        let n = b.lens.len();
        let (data, tags) = b.buf.split_at_mut(tags_at);
        for (j, (chunk, tag_space)) in data.chunks_mut(cs).zip(tags.chunks_mut(TAG_LEN)).take(n).enumerate() {
            let nonce = nonce(&p.nonce_prefix, (b.first + j as u64) as u32, b.last && j == n - 1);
            tag_space.copy_from_slice(&cipher.seal(nonce, &header_hash, &mut chunk[..b.lens[j]])?);
        }
        Ok(())
    };
    let consume = |b: &Batch| -> Result<(), CryptoError> {
        let (data, tags) = b.buf.split_at(tags_at);
        let mut parts = Vec::with_capacity(2 * b.lens.len());
        for ((chunk, tag), &len) in data.chunks(cs).zip(tags.chunks(TAG_LEN)).zip(&b.lens) {
            parts.push(IoSlice::new(&chunk[..len]));
            parts.push(IoSlice::new(tag));
        }
        if let Some(h) = chunks_hash.as_mut() {
            parts.iter().for_each(|part| h.update(&part[..]));
        }
        write_all_vectored(&mut output, &mut parts)?;
        Ok(())
    };
    pipeline::run(pipeline::buffers(), buf_len, produce, work, consume)?;
    if let (Some(id), Some(h)) = (sign_with, chunks_hash) {
        let sig = id.sign(&trailer_sig_message(&header_hash, &h.finalize()));
        output.write_all(&sig.to_bytes())?;
    }
    output.flush()?;
    Ok(total)
}

/// Check the signer requirement and the header signature: no key needed,
/// so this runs before any RSA private-key operation.
fn check_sender(prefix: &Prefix, require_signer: Option<&PublicIdentity>) -> Result<(), CryptoError> {
    if let Some(want) = require_signer {
        let want_key = want.verifying_key()?;
        match prefix.header.sender {
            None => return Err(CryptoError::Unsigned(want.node_id.clone())),
            Some(pk) if pk != *want_key.as_bytes() => {
                return Err(CryptoError::WrongSigner {
                    expected: want.node_id.clone(),
                    found: prefix.signer().unwrap_or_else(|| "(invalid key)".into()),
                })
            }
            Some(_) => {}
        }
    }
    if let (Some(pk), Some(sig)) = (&prefix.header.sender, &prefix.header_sig) {
        verify_sig(pk, &header_sig_message(&prefix.signed), sig)?;
    }
    Ok(())
}

/// Find our stanza (by key id: no private-key operation) and unwrap the
/// file key with blinded RSA. A padding failure yields a random key
/// (implicit rejection): the caller then fails on chunk 0 exactly as for a
/// damaged chunk, so the two cannot be told apart.
fn unwrap_file_key(me: &Identity, header: &Header) -> Result<[u8; 32], CryptoError> {
    let found = header
        .recipients
        .iter()
        .find_map(|s| me.decryption_keys().find(|k| k.key_id() == &s.key_id).map(|k| (k, s)));
    let Some((pair, stanza)) = found else {
        return Err(CryptoError::NotForMe(
            header.recipients.iter().map(|s| hex::encode(&s.key_id[..8])).collect(),
        ));
    };
    let mut key = [0u8; 32];
    OsRng.fill_bytes(&mut key);
    if let Ok(k) = pair.rsa_private().decrypt_blinded(
        &mut OsRng,
        Oaep::new_with_label::<Sha256, _>(OAEP_LABEL),
        &stanza.wrapped,
    ) {
        if k.len() == 32 {
            key.copy_from_slice(&k);
        }
    }
    Ok(key)
}

/// Decrypt a stream. The signer requirement and the header signature are
/// checked before the RSA unwrap; the trailer signature (content) after
/// the last chunk. Plaintext is written as each chunk's tag verifies, which
/// proves nothing yet about the sender (a co-recipient can seal a chunk) or
/// completeness: `output` must be a spool the caller releases only if this
/// returns `Ok`, and discards otherwise (see `files::decrypt_file`).
pub fn decrypt_stream<R: Read, W: Write + Send>(
    me: &Identity,
    mut input: R,
    output: W,
    require_signer: Option<&PublicIdentity>,
) -> Result<StreamReport, CryptoError> {
    let prefix = read_prefix(&mut input)?;
    check_sender(&prefix, require_signer)?;
    let key = unwrap_file_key(me, &prefix.header)?;
    open_chunks(&prefix, &key, input, output)
}

fn open_chunks<R: Read, W: Write + Send>(
    prefix: &Prefix,
    file_key: &[u8; 32],
    mut input: R,
    mut output: W,
) -> Result<StreamReport, CryptoError> {
    let cipher = ChunkCipher::new(file_key);
    let cs = prefix.header.chunk_size;
    let ct = cs + TAG_LEN;
    let per_batch = batch_chunks(cs);
    let trailer = if prefix.header.sender.is_some() { SIG_LEN } else { 0 };
    let mut chunks_hash = prefix.header.sender.map(|_| Sha256::new());
    // A batch buffer holds its chunks, the trailer and one more byte: a full
    // buffer means none of the batch's chunks is the final one. The bytes
    // past the batch are carried into the next buffer.
    let want = per_batch * ct + trailer + 1;
    let mut leftover: Vec<u8> = Vec::with_capacity(trailer + 1);
    let mut counter: u64 = 0;
    let produce = |b: &mut Batch| -> Result<(), CryptoError> {
        let l = leftover.len();
        b.buf[..l].copy_from_slice(&leftover);
        let have = l + read_full(&mut input, &mut b.buf[l..want])?;
        let eof = have < want;
        let body = if !eof {
            per_batch * ct
        } else if have >= TAG_LEN + trailer {
            have - trailer
        } else if counter == 0 {
            return Err(CryptoError::Truncated("it ends before the first chunk".into()));
        } else {
            return Err(CryptoError::Damaged(counter));
        };
        let n = body.div_ceil(ct);
        let last_len = body - (n - 1) * ct;
        let final_index = counter + n as u64 - 1;
        if counter + n as u64 > MAX_CHUNKS {
            return Err(CryptoError::TooLarge);
        }
        // A final chunk shorter than a tag is cut; an empty final chunk
        // only ends an empty payload (no writer produces anything else).
        if eof && (last_len < TAG_LEN || (last_len == TAG_LEN && final_index > 0)) {
            return Err(CryptoError::Damaged(final_index));
        }
        if let Some(h) = chunks_hash.as_mut() {
            h.update(&b.buf[..body]);
        }
        if eof {
            if let (Some(pk), Some(h)) = (&prefix.header.sender, chunks_hash.take()) {
                let sig: [u8; SIG_LEN] = b.buf[body..have].try_into().expect("trailer is SIG_LEN bytes");
                verify_sig(pk, &trailer_sig_message(&prefix.header_hash, &h.finalize()), &sig)?;
            }
        } else {
            leftover.clear();
            leftover.extend_from_slice(&b.buf[body..want]);
        }
        b.lens.clear();
        b.lens.resize(n - 1, ct);
        b.lens.push(last_len);
        b.first = counter;
        b.last = eof;
        counter += n as u64;
        Ok(())
    };
    let open = |i: u64, last: bool, chunk: &mut [u8]| -> bool {
        let (data, tag) = chunk.split_at_mut(chunk.len() - TAG_LEN);
        let tag: [u8; TAG_LEN] = (*tag).try_into().expect("TAG_LEN bytes");
        cipher.open(
            nonce(&prefix.header.nonce_prefix, i as u32, last),
            &prefix.header_hash,
            data,
            tag,
        )
    };
    let work = |b: &mut Batch| -> Result<(), CryptoError> {
        let n = b.lens.len();
        for (j, chunk) in b.buf.chunks_mut(ct).take(n).enumerate() {
            let i = b.first + j as u64;
            let last = b.last && j == n - 1;
            let chunk = &mut chunk[..b.lens[j]];
            // A full final chunk that opens as a middle chunk means the real
            // final chunk(s) were cut off. Safe to say: the file key is
            // already proven good by this point, nothing about RSA leaks.
            // A failed open overwrites the chunk, so keep the ciphertext for
            // that second try (at most one chunk per stream).
            let retry = (last && chunk.len() == ct && trailer == 0).then(|| chunk.to_vec());
            if open(i, last, chunk) {
                continue;
            }
            if let Some(saved) = retry {
                chunk.copy_from_slice(&saved);
            }
            if last && chunk.len() == ct && trailer == 0 && open(i, false, chunk) {
                return Err(CryptoError::Truncated(format!(
                    "the final chunk is missing after chunk {i}"
                )));
            }
            return Err(CryptoError::Damaged(i));
        }
        Ok(())
    };
    let mut total: u64 = 0;
    let consume = |b: &Batch| -> Result<(), CryptoError> {
        let mut parts: Vec<IoSlice<'_>> = b
            .buf
            .chunks(ct)
            .zip(&b.lens)
            .map(|(c, len)| IoSlice::new(&c[..len - TAG_LEN]))
            .collect();
        total += parts.iter().map(|p| p.len() as u64).sum::<u64>();
        write_all_vectored(&mut output, &mut parts)?;
        Ok(())
    };
    pipeline::run(pipeline::buffers(), want, produce, work, consume)?;
    output.flush()?;
    Ok(StreamReport {
        signer: prefix.signer(),
        bytes: total,
    })
}

/// `Write::write_all_vectored` is not stable yet: write every slice, in order.
fn write_all_vectored<W: Write>(w: &mut W, mut parts: &mut [IoSlice<'_>]) -> io::Result<()> {
    // Empty slices (an empty payload's chunk) would make a writer report 0.
    while parts.iter().any(|p| !p.is_empty()) {
        match w.write_vectored(parts) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Chunks per batch: about 512 KiB of work per hand-off.
fn batch_chunks(chunk_size: usize) -> usize {
    ((512 << 10) / chunk_size).clamp(1, 64)
}

/// Encrypt an in-memory payload (market tasks and results).
pub fn encrypt_to(
    recipients: &[PublicIdentity],
    sign_with: Option<&Identity>,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(plaintext.len() + plaintext.len() / 1024 + 1024);
    encrypt_stream(recipients, sign_with, plaintext, &mut out)?;
    Ok(out)
}

/// Decrypt an in-memory payload. A signed envelope's signatures (header and
/// content) are verified before any RSA private-key operation, so a payload
/// from the network cannot drive our private key unless its sender signed
/// it; `require_signer` additionally pins who that sender must be.
pub fn decrypt(me: &Identity, envelope: &[u8], require_signer: Option<&PublicIdentity>) -> Result<Opened, CryptoError> {
    let mut rest = envelope;
    let prefix = read_prefix(&mut rest)?;
    check_sender(&prefix, require_signer)?;
    if let Some(pk) = &prefix.header.sender {
        if rest.len() < SIG_LEN + TAG_LEN {
            return Err(CryptoError::Truncated("it ends before the first chunk".into()));
        }
        let (chunks, sig) = rest.split_at(rest.len() - SIG_LEN);
        let sig: [u8; SIG_LEN] = sig.try_into().expect("SIG_LEN bytes");
        let chunks_hash = Sha256::digest(chunks);
        verify_sig(pk, &trailer_sig_message(&prefix.header_hash, &chunks_hash), &sig)?;
    }
    let key = unwrap_file_key(me, &prefix.header)?;
    let mut plaintext = Vec::with_capacity(rest.len());
    let report = open_chunks(&prefix, &key, rest, &mut plaintext)?;
    debug_assert_eq!(prefix.len() + rest.len(), envelope.len());
    Ok(Opened {
        plaintext,
        signer: report.signer,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crypto::keys::KeyPair;
    use chrono::{DateTime, Utc};
    use ed25519_dalek::SigningKey;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use std::sync::OnceLock;

    const FORMAT_MD: &str = include_str!("../../docs/FORMAT.md");

    /// The fenced block after a `<!-- vector:NAME -->` marker in FORMAT.md.
    pub(crate) fn vector(name: &str) -> String {
        let marker = format!("<!-- vector:{name} -->");
        let at = FORMAT_MD
            .find(&marker)
            .unwrap_or_else(|| panic!("FORMAT.md lacks {marker}"));
        let rest = &FORMAT_MD[at + marker.len()..];
        let start = rest.find("```").expect("fence") + 3;
        let rest = &rest[start..];
        let rest = &rest[rest.find('\n').expect("newline") + 1..];
        rest[..rest.find("```").expect("closing fence")].to_string()
    }

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.split_whitespace().collect::<String>()).expect("hex")
    }

    fn created() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    /// The documented test identity (fixed keys: RSA key from FORMAT.md,
    /// Ed25519 seed from FORMAT.md).
    pub(crate) fn vector_identity() -> &'static Identity {
        static ID: OnceLock<Identity> = OnceLock::new();
        ID.get_or_init(|| {
            let seed: [u8; 32] = unhex(&vector("ed25519-seed")).try_into().unwrap();
            let rsa = <rsa::RsaPrivateKey as rsa::pkcs8::DecodePrivateKey>::from_pkcs8_pem(&vector("rsa-private-key"))
                .expect("vector RSA key");
            Identity::from_pairs(
                KeyPair::from_parts(SigningKey::from_bytes(&seed), rsa, created()).unwrap(),
                vec![],
            )
        })
    }

    fn seal_fixed(chunk: usize, signed: bool, pt: &[u8]) -> Vec<u8> {
        let id = vector_identity();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut out = Vec::new();
        let params = SealParams {
            chunk_size: chunk,
            file_key: unhex(&vector("file-key")).try_into().unwrap(),
            nonce_prefix: unhex(&vector("nonce-prefix")).try_into().unwrap(),
            rng: &mut rng,
        };
        seal(&[id.public()], signed.then_some(id), pt, &mut out, params).unwrap();
        out
    }

    #[test]
    fn documented_vector_decrypts() {
        let id = vector_identity();
        let env = unhex(&vector("envelope"));
        let opened = decrypt(id, &env, Some(&id.public())).unwrap();
        assert_eq!(opened.plaintext, vector("plaintext").trim_end().as_bytes());
        assert_eq!(opened.signer.as_deref(), Some(id.node_id()));
        assert_eq!(id.node_id(), vector("node-id").trim());
    }

    #[test]
    fn documented_vector_is_reproduced() {
        let pt = vector("plaintext");
        let env = seal_fixed(16, true, pt.trim_end().as_bytes());
        assert_eq!(
            hex::encode(&env),
            unhex(&vector("envelope"))
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
    }

    #[test]
    #[ignore = "prints a fresh vector for docs/FORMAT.md"]
    fn print_vector() {
        let pt = vector("plaintext");
        let env = seal_fixed(16, true, pt.trim_end().as_bytes());
        for line in hex::encode(env).as_bytes().chunks(64) {
            println!("{}", std::str::from_utf8(line).unwrap());
        }
    }

    fn roundtrip(chunk: usize, signed: bool, pt: &[u8]) {
        let id = vector_identity();
        let mut rng = rand::rngs::StdRng::seed_from_u64(pt.len() as u64);
        let mut out = Vec::new();
        let params = SealParams {
            chunk_size: chunk,
            file_key: [9; 32],
            nonce_prefix: [3; 7],
            rng: &mut rng,
        };
        seal(&[id.public()], signed.then_some(id), pt, &mut out, params).unwrap();
        let opened = decrypt(id, &out, None).unwrap();
        assert_eq!(opened.plaintext, pt);
        let mut streamed = Vec::new();
        decrypt_stream(id, &out[..], &mut streamed, None).unwrap();
        assert_eq!(streamed, pt);
        // Dropping the last byte always fails.
        assert!(decrypt(id, &out[..out.len() - 1], None).is_err());
    }

    #[test]
    fn chunk_boundaries_round_trip() {
        for chunk in [16usize, 64] {
            for n in [
                0,
                1,
                chunk - 1,
                chunk,
                chunk + 1,
                2 * chunk,
                2 * chunk + 1,
                5 * chunk - 1,
            ] {
                roundtrip(chunk, false, &vec![0xa5; n]);
                roundtrip(chunk, true, &vec![0x5a; n]);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn random_sizes_round_trip(data in proptest::collection::vec(any::<u8>(), 0..4000), chunk in 16usize..80, signed: bool) {
            roundtrip(chunk, signed, &data);
        }

        #[test]
        fn parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = read_prefix(&mut &data[..]);
            let _ = decrypt(vector_identity(), &data, None);
        }
    }

    #[test]
    fn a_cut_off_final_chunk_is_reported_as_truncation() {
        // Three full chunks: dropping the last leaves a full middle chunk
        // where the final one should be. Telling the two apart opens that
        // chunk twice, so the first (failed) try must not spoil it.
        let id = vector_identity();
        let env = seal_fixed(16, false, &[7u8; 48]);
        let cut = &env[..env.len() - (16 + TAG_LEN)];
        let want = "the final chunk is missing after chunk 1";
        assert!(matches!(decrypt(id, cut, None), Err(CryptoError::Truncated(m)) if m == want));
        let mut sink = Vec::new();
        assert!(matches!(decrypt_stream(id, cut, &mut sink, None), Err(CryptoError::Truncated(m)) if m == want));
        assert_eq!(decrypt(id, &env, None).unwrap().plaintext, [7u8; 48]);
    }

    #[test]
    fn swapped_chunks_fail() {
        let id = vector_identity();
        let env = seal_fixed(16, false, &[7u8; 64]);
        let start = read_prefix(&mut &env[..]).unwrap().len();
        let mut bad = env.clone();
        let ct = 16 + TAG_LEN;
        let (a, b) = (start, start + ct);
        let first: Vec<u8> = bad[a..a + ct].to_vec();
        bad.copy_within(b..b + ct, a);
        bad[b..b + ct].copy_from_slice(&first);
        assert!(matches!(decrypt(id, &bad, None), Err(CryptoError::Damaged(0))));
    }

    #[test]
    fn a_co_recipient_cannot_forge_signed_content() {
        // Keep the signed header but re-seal different content with the
        // (known) file key: the trailer signature must catch it.
        let id = vector_identity();
        let env = seal_fixed(16, true, b"original content");
        let prefix = read_prefix(&mut &env[..]).unwrap();
        let cipher = ChunkCipher::new(&unhex(&vector("file-key")).try_into().unwrap());
        let mut forged = env[..prefix.len()].to_vec();
        let mut chunk = b"forged content!!".to_vec();
        let tag = cipher
            .seal(
                nonce(&prefix.header.nonce_prefix, 0, true),
                &prefix.header_hash,
                &mut chunk,
            )
            .unwrap();
        forged.extend_from_slice(&chunk);
        forged.extend_from_slice(&tag);
        forged.extend_from_slice(&env[env.len() - SIG_LEN..]);
        assert!(matches!(decrypt(id, &forged, None), Err(CryptoError::BadSignature)));
        let mut sink = Vec::new();
        assert!(matches!(
            decrypt_stream(id, &forged[..], &mut sink, None),
            Err(CryptoError::BadSignature)
        ));
    }
}
