//! Savepoints on the writer's shared transaction: rusqlite's `savepoint()`
//! wants `&mut`, but the writer holds the transaction across the whole
//! batch, so it opens savepoints by hand. One dropped without
//! [`Savepoint::commit`] rolls back to where it began.
//!
//! It must not outlive one request (or one clock tick): each gets its own,
//! so a refusal undoes that request alone.

use rusqlite::Connection;

/// A savepoint on a shared transaction reference. rusqlite's `savepoint()`
/// wants `&mut`; the writer holds the transaction across the whole batch, so
/// it opens savepoints by hand.
pub trait SavepointExt {
    fn unchecked_transaction_savepoint(&self) -> rusqlite::Result<Savepoint<'_>>;
}

pub struct Savepoint<'a> {
    conn: &'a Connection,
    done: bool,
}

impl SavepointExt for Connection {
    fn unchecked_transaction_savepoint(&self) -> rusqlite::Result<Savepoint<'_>> {
        self.prepare_cached("SAVEPOINT op")?.execute([])?;
        Ok(Savepoint {
            conn: self,
            done: false,
        })
    }
}

impl Savepoint<'_> {
    pub fn commit(mut self) -> rusqlite::Result<()> {
        self.done = true;
        self.conn.prepare_cached("RELEASE op")?.execute([]).map(|_| ())
    }
}

impl std::ops::Deref for Savepoint<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Savepoint<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self
                .conn
                .prepare_cached("ROLLBACK TO op")
                .and_then(|mut s| s.execute([]));
            let _ = self.conn.prepare_cached("RELEASE op").and_then(|mut s| s.execute([]));
        }
    }
}
