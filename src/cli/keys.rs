//! `keys`: the node identity (generate, show, export, import, list, rotate).

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use crate::context::Ctx;
use crate::crypto::keys::{self, Identity, Keyring, PublicIdentity};
use crate::exit::{Exit, Failure, Result};
use crate::fsutil;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create this node's Ed25519 signing key and RSA-3072 encryption key
    Generate {
        /// Discard existing keys (files encrypted to them become undecryptable)
        #[arg(long)]
        force: bool,
    },
    /// Print this node's public identity (node id, public keys, creation time)
    Show,
    /// Write this node's public identity to a file others can `keys import`
    Export {
        /// File to write the public identity (JSON) to
        #[arg(long, value_name = "FILE")]
        public: PathBuf,
        /// Replace FILE if it exists
        #[arg(long)]
        force: bool,
    },
    /// Add a peer's public identity to the keyring under NAME
    Import {
        /// Name to refer to the peer by (`--recipient NAME`)
        name: String,
        /// The peer's `keys export --public` file
        file: PathBuf,
        /// The peer is another node of yours: with a subscription login,
        /// `advertise` serves tasks only from such nodes (and `market.ownNodes`)
        #[arg(long)]
        own: bool,
    },
    /// List this node's keys and the peers in the keyring
    List,
    /// Make new keys current; old keys still decrypt for `security.keyRotationDays`
    Rotate,
}

pub fn run(ctx: &Ctx, args: Args) -> Result<Exit> {
    let p = ctx.out();
    match args.command {
        KeysCommand::Generate { force } => {
            let id = Identity::generate(&ctx.paths, force)?;
            let public = id.public();
            if p.json {
                p.json(json!({ "ok": true, "identity": public }));
            } else {
                p.out(&format!("Generated node keys.\nnode id: {}", public.node_id));
                p.note("Share your public identity with `claude-max-market keys export --public FILE`.");
            }
        }
        KeysCommand::Show => {
            let id = Identity::load_or_generate(&ctx.paths)?;
            let public = id.public();
            if p.json {
                p.json(serde_json::to_value(&public).expect("identity serialises"));
            } else {
                p.out(&show_block(&public, &id));
            }
        }
        KeysCommand::Export { public: file, force } => {
            let id = Identity::load_or_generate(&ctx.paths)?;
            if file.symlink_metadata().is_ok() && !force {
                return Err(
                    Failure::usage(format!("{} already exists; not overwriting it", file.display()))
                        .hint("pass `--force` to replace it")
                        .into(),
                );
            }
            let public = id.public();
            let bytes = serde_json::to_vec_pretty(&public).expect("identity serialises");
            fsutil::atomic_write(&file, &bytes).map_err(|e| {
                Failure::new(
                    crate::exit::Exit::Failed,
                    format!("cannot write {}: {e}", file.display()),
                )
            })?;
            if p.json {
                p.json(json!({ "ok": true, "file": file, "node_id": public.node_id }));
            } else {
                p.out(&format!(
                    "Wrote the public identity of node {} to {}",
                    public.node_id,
                    file.display()
                ));
            }
        }
        KeysCommand::Import { name, file, own } => {
            let public = keys::read_public_file(&file)?;
            Keyring::new(&ctx.paths).import_audited(&ctx.paths, &name, &public, own)?;
            if p.json {
                p.json(json!({ "ok": true, "name": name, "node_id": public.node_id, "own": own }));
            } else if own {
                p.out(&format!(
                    "Imported `{name}`: node {}, one of your own nodes",
                    public.node_id
                ));
            } else {
                p.out(&format!("Imported `{name}`: node {}", public.node_id));
            }
        }
        KeysCommand::List => {
            let own = keys::own_keys(&ctx.paths)?;
            let peers = Keyring::new(&ctx.paths).list()?;
            let own_ids = Keyring::new(&ctx.paths).own_node_ids();
            if p.json {
                let peers: Vec<_> = peers
                    .iter()
                    .map(|(n, id)| {
                        json!({ "name": n, "node_id": id.node_id, "created": id.created,
                                "own": own_ids.contains(&id.node_id) })
                    })
                    .collect();
                p.json(json!({ "keys": own, "peers": peers }));
            } else {
                let mut s = String::from("This node:\n");
                if own.is_empty() {
                    s.push_str("  (no keys yet: `claude-max-market keys generate`)\n");
                }
                for k in &own {
                    let state = match (&k.current, &k.usable_until) {
                        (true, _) => "current".to_string(),
                        (false, Some(u)) => format!("retired, decrypts until {u}"),
                        (false, None) => "retired".to_string(),
                    };
                    s.push_str(&format!("  {}  created {}  {state}\n", k.node_id, k.created));
                }
                s.push_str("Peers:\n");
                if peers.is_empty() {
                    s.push_str("  (none: `claude-max-market keys import NAME FILE`)\n");
                }
                for (n, id) in &peers {
                    s.push_str(&format!("  {n:<20} {}\n", id.node_id));
                }
                p.out(&s);
            }
        }
        KeysCommand::Rotate => {
            let r = Identity::rotate(&ctx.paths)?;
            if p.json {
                p.json(json!({ "ok": true, "rotation": r }));
            } else {
                p.out(&format!(
                    "Rotated node keys.\nnew node id: {}\nold node id: {} (decrypts until {})\nremoved expired keys: {}",
                    r.new.node_id, r.old_node_id, r.old_usable_until, r.removed
                ));
                p.note("Peers need your new public identity: `claude-max-market keys export --public FILE`.");
            }
        }
    }
    Ok(Exit::Ok)
}

fn show_block(public: &PublicIdentity, id: &Identity) -> String {
    use ed25519_dalek::pkcs8::EncodePublicKey as _;
    let ed_pem = id
        .current()
        .verifying_key()
        .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .unwrap_or_default();
    format!(
        "node id:   {}\ncreated:   {}\nkey id:    {}\ned25519:   {}\n\nEd25519 signing public key:\n{}\nRSA-3072 encryption public key:\n{}",
        public.node_id,
        public.created,
        hex::encode(id.current().key_id()),
        public.ed25519,
        ed_pem,
        public.rsa_public_pem
    )
}
