//! `decrypt`: open an envelope; the output file appears, or stdout gets the
//! plaintext, only once every chunk and the sender's signature verified.

use crate::exit::{Exit, Result};
use serde_json::json;

use crate::context::Ctx;
use crate::crypto::files::{self, Sink, Source};
use crate::crypto::keys::{self, Identity};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Envelope to decrypt, or `-` for stdin
    #[arg(long, short, value_name = "F|-")]
    pub input: String,
    /// Where to write the plaintext, `-` for stdout (default: F without `.cmm`, or stdout for stdin); stdout gets it only after it verified, held in `$TMPDIR` until then
    #[arg(long, short, value_name = "F|-")]
    pub output: Option<String>,
    /// Fail unless the envelope is signed by this keyring name, identity file, or `self`
    #[arg(long, value_name = "NAME")]
    pub require_signer: Option<String>,
    /// Replace the output file if it exists
    #[arg(long)]
    pub force: bool,
}

pub fn run(ctx: &Ctx, args: Args) -> Result<Exit> {
    let me = Identity::load(&ctx.paths)?;
    let require = args
        .require_signer
        .as_deref()
        .map(|s| keys::resolve_peer(&ctx.paths, &me.public(), s))
        .transpose()?;
    let source = Source::parse(&args.input);
    let sink = match &args.output {
        Some(o) => Sink::parse(o),
        None => files::decrypted_name(&source)?,
    };
    let report = files::decrypt_file(&me, &source, &sink, args.force, require.as_ref())?;
    let signer = report
        .signer
        .as_deref()
        .map(|id| keys::describe_node(&ctx.paths, &me, id));
    let p = ctx.out();
    match &sink {
        Sink::File(path) if p.json => p.json(json!({
            "ok": true, "output": path, "bytes": report.bytes, "signer": report.signer, "signed_by": signer,
        })),
        _ => {
            let who = match &signer {
                Some(s) => format!("signed by {s}"),
                None => "not signed".to_string(),
            };
            match &sink {
                Sink::File(path) => p.note(&format!(
                    "Decrypted {} bytes -> {} ({who})",
                    report.bytes,
                    path.display()
                )),
                Sink::Stdout => p.note(&format!("Decrypted {} bytes ({who})", report.bytes)),
            }
        }
    }
    Ok(Exit::Ok)
}
