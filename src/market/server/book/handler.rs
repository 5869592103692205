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

pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut b);
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
