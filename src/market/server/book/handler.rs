//! What every request handler is given ([`Context`]) and how it fails
//! ([`Fail`], [`reject`]), the outbox its events wait in until the caller
//! commits, and the ids the book hands out.
//!
//! It must not apply anything itself.

use rand::RngCore;

use super::rules::BookRules;
use crate::market::protocol::{Event, Reason, Rejection};
use crate::market::server::store::{Db, DbError};

/// Why a request did not apply: refused, or the database failed.
#[derive(Debug)]
pub enum Fail {
    Reject(Rejection),
    Sql(DbError),
}

impl From<DbError> for Fail {
    fn from(e: DbError) -> Self {
        Fail::Sql(e)
    }
}

pub fn reject<T>(reason: Reason, message: impl Into<String>) -> Result<T, Fail> {
    Err(Fail::Reject(Rejection::new(reason, message)))
}

/// Messages to send once the transaction commits: (node id, event).
pub type Outbox = Vec<(String, Event)>;

/// A new id: `prefix` and 24 hex digits, the first 12 the time in
/// milliseconds and the rest random. Ids made close in time sort close
/// together, so a batch's new rows (and the escrow accounts and attempt
/// rows keyed by them) land on the same few index pages instead of one
/// random page each. Nothing is authorised by knowing an id.
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    let ms = crate::market::server::writer::now_ms().max(0) as u64;
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    rand::thread_rng().fill_bytes(&mut b[6..]);
    format!("{prefix}{}", hex::encode(b))
}

/// What a request handler applies against: the caller's transaction, the
/// rules, the node that sent the request, the time, who is online, and the
/// outbox its events go to.
pub struct Context<'a> {
    pub c: Db<'a>,
    pub rules: &'a BookRules,
    pub node: &'a str,
    pub now: i64,
    pub online: &'a dyn Fn(&str) -> bool,
    pub out: &'a mut Outbox,
}
