//! `encrypt`: seal a file or stdin to one or more recipients (default: this node).

use crate::exit::{Exit, Result};
use serde_json::json;

use crate::context::Ctx;
use crate::crypto::files::{self, Sink, Source};
use crate::crypto::keys::{self, Identity};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// File to encrypt, or `-` for stdin
    #[arg(long, short, value_name = "F|-")]
    pub input: String,
    /// Where to write the envelope, `-` for stdout (default: `F.cmm`, or stdout for stdin)
    #[arg(long, short, value_name = "F|-")]
    pub output: Option<String>,
    /// A keyring name, a public identity file, or `self`; repeat for several (default: self)
    #[arg(long = "recipient", short, value_name = "NAME|FILE")]
    pub recipients: Vec<String>,
    /// Sign with this node's Ed25519 key so recipients can verify the sender
    #[arg(long)]
    pub sign: bool,
    /// Replace the output file if it exists
    #[arg(long)]
    pub force: bool,
}

pub fn run(ctx: &Ctx, args: Args) -> Result<Exit> {
    let me = Identity::load_or_generate(&ctx.paths)?;
    let own = me.public();
    let recipients = if args.recipients.is_empty() {
        vec![own.clone()]
    } else {
        args.recipients
            .iter()
            .map(|r| keys::resolve_peer(&ctx.paths, &own, r))
            .collect::<Result<Vec<_>, _>>()?
    };
    let source = Source::parse(&args.input);
    let sink = match &args.output {
        Some(o) => Sink::parse(o),
        None => files::encrypted_name(&source),
    };
    let bytes = files::encrypt_file(&recipients, args.sign.then_some(&me), &source, &sink, args.force)?;
    let p = ctx.out();
    let to: Vec<&str> = recipients.iter().map(|r| r.node_id.as_str()).collect();
    match &sink {
        Sink::File(path) if p.json => p.json(json!({
            "ok": true, "output": path, "bytes": bytes, "recipients": to, "signed": args.sign,
        })),
        Sink::File(path) => p.note(&format!(
            "Encrypted {bytes} bytes to {} recipient(s){} -> {}",
            to.len(),
            if args.sign { ", signed" } else { "" },
            path.display()
        )),
        // Stdout carries the envelope: say nothing there.
        Sink::Stdout => p.detail(&format!("Encrypted {bytes} bytes to {} recipient(s)", to.len())),
    }
    Ok(Exit::Ok)
}
