//! The coordinator's store interface: one SQL face over two engines.
//!
//! [`Db`] is a handle on the writer's open transaction. The order book,
//! the ledger and the checks run their statements through it, written once
//! in the SQL both engines share (`?N` placeholders, `ON CONFLICT`,
//! `RETURNING`, `CAST(... AS BIGINT)` around sums), so the market's rules
//! live in one place whichever engine holds the rows:
//! - SQLite ([`sqlite`]): one file, one process; the embedded default.
//! - PostgreSQL ([`postgres`]): one database shared by any number of
//!   `market serve` replicas.
//!
//! [`Store`] is the writer's connection: begin, commit, roll back. It must
//! not hold market rules: it knows statements and rows, not what they mean.

pub mod postgres;
pub mod sqlite;

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;

/// Where the market's rows live: a SQLite file or a PostgreSQL URL.
#[derive(Clone, PartialEq, Eq)]
pub enum DbSpec {
    Sqlite(PathBuf),
    Postgres(String),
}

impl DbSpec {
    /// `postgres://...` / `postgresql://...` is PostgreSQL; anything else
    /// is a SQLite file path.
    pub fn parse(s: &str) -> DbSpec {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            DbSpec::Postgres(s.to_string())
        } else {
            DbSpec::Sqlite(PathBuf::from(s))
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, DbSpec::Postgres(_))
    }

    /// The store in force: `flag` (`--db`), else `configured`
    /// (`market.db`, env `CMM_MARKET_DB` folded in), else `default`.
    pub fn resolve(flag: Option<&str>, configured: Option<&str>, default: PathBuf) -> DbSpec {
        match flag.or(configured).filter(|s| !s.is_empty()) {
            Some(s) => DbSpec::parse(s),
            None => DbSpec::Sqlite(default),
        }
    }
}

/// A migration both engines run (SQLite's v8, PostgreSQL's v3): fewer
/// index entries to move when a task changes state. `tasks_delivered`
/// (state, delivered_at) already serves every look-up by state; a
/// provider's tasks are found by provider alone; an offer's load counts
/// only its leased tasks, so only those are indexed by offer.
const LEANER_TASK_INDEXES: &str = r#"
DROP INDEX IF EXISTS tasks_state;
DROP INDEX IF EXISTS tasks_provider;
CREATE INDEX tasks_provider ON tasks(provider);
DROP INDEX IF EXISTS tasks_offer;
CREATE INDEX tasks_leased ON tasks(offer_id) WHERE state IN ('assigned','delivered');
"#;

/// Shown without a password: `postgres://user:secret@host/db` prints as
/// `postgres://user:***@host/db`, so logs and `--json` never carry it.
impl fmt::Display for DbSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbSpec::Sqlite(p) => write!(f, "{}", p.display()),
            DbSpec::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl fmt::Debug for DbSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbSpec({self})")
    }
}

/// `scheme://user:password@rest` with the password replaced.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!("{}{}:***{}", &url[..scheme_end + 3], &rest[..colon], &rest[at..]),
        None => url.to_string(),
    }
}

/// A database failure, from either engine.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Its message already holds its causes (see `pg_message`), so it is
    /// not chained as a source: an error report would say them twice.
    #[error("{}", pg_message(.0))]
    Postgres(::postgres::Error),
    #[error("{0}")]
    Schema(String),
    #[error("column {0}: {1}")]
    Type(usize, String),
    /// The database did not answer in time; the connection is dropped.
    #[error("{0}")]
    NoAnswer(String),
}

impl From<::postgres::Error> for DbError {
    fn from(e: ::postgres::Error) -> Self {
        DbError::Postgres(e)
    }
}

/// PostgreSQL's own message (with its detail), not only "db error".
fn pg_message(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.detail() {
            Some(detail) => format!("{}: {detail}", d.message()),
            None => d.message().to_string(),
        },
        None => {
            // The driver's message, then each cause it does not already say.
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(cause) = src {
                let c = cause.to_string();
                if !s.contains(&c) {
                    s.push_str(": ");
                    s.push_str(&c);
                }
                src = cause.source();
            }
            s
        }
    }
}

impl DbError {
    /// The statement gave way to another replica's: it waited too long for
    /// a row, or was chosen to end a deadlock. Nothing of it happened and
    /// the same request can be sent again.
    pub fn is_contention(&self) -> bool {
        use ::postgres::error::SqlState;
        match self {
            DbError::Postgres(e) => e.code().is_some_and(|c| {
                [
                    SqlState::LOCK_NOT_AVAILABLE,
                    SqlState::T_R_DEADLOCK_DETECTED,
                    SqlState::T_R_SERIALIZATION_FAILURE,
                ]
                .contains(c)
            }),
            _ => false,
        }
    }

    /// The database could not be reached (as opposed to refusing a
    /// statement): the replica reports itself unavailable.
    pub fn is_unreachable(&self) -> bool {
        match self {
            DbError::Postgres(e) => e.is_closed() || e.as_db_error().is_none_or(|d| is_shutdown_code(d.code())),
            DbError::NoAnswer(_) => true,
            _ => false,
        }
    }
}

/// PostgreSQL's codes for "the server is going away or not there".
fn is_shutdown_code(code: &::postgres::error::SqlState) -> bool {
    use ::postgres::error::SqlState;
    [
        SqlState::ADMIN_SHUTDOWN,
        SqlState::CRASH_SHUTDOWN,
        SqlState::CANNOT_CONNECT_NOW,
        SqlState::CONNECTION_FAILURE,
        SqlState::CONNECTION_EXCEPTION,
        SqlState::CONNECTION_DOES_NOT_EXIST,
    ]
    .contains(code)
}

pub type Result<T> = std::result::Result<T, DbError>;

/// A statement parameter or a column value.
#[derive(Debug, Clone, PartialEq)]
pub enum V<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(Cow<'a, str>),
    Blob(Cow<'a, [u8]>),
}

/// A column value read out of a row.
pub type Value = V<'static>;

impl V<'_> {
    /// The same value, owning its text or bytes.
    pub fn to_owned_value(&self) -> Value {
        match self {
            V::Null => V::Null,
            V::Int(i) => V::Int(*i),
            V::Real(f) => V::Real(*f),
            V::Text(s) => V::Text(Cow::Owned(s.to_string())),
            V::Blob(b) => V::Blob(Cow::Owned(b.to_vec())),
        }
    }
}

/// A statement parameter, borrowed: what `args!` takes.
pub trait Arg {
    fn arg(&self) -> V<'_>;
}

macro_rules! arg_int {
    ($($t:ty),*) => {$(
        impl Arg for $t {
            fn arg(&self) -> V<'_> {
                V::Int(*self as i64)
            }
        }
    )*};
}
arg_int!(i64, i32, u32, u64, usize, bool);

impl Arg for f64 {
    fn arg(&self) -> V<'_> {
        V::Real(*self)
    }
}
impl Arg for str {
    fn arg(&self) -> V<'_> {
        V::Text(Cow::Borrowed(self))
    }
}
impl Arg for String {
    fn arg(&self) -> V<'_> {
        V::Text(Cow::Borrowed(self.as_str()))
    }
}
impl Arg for [u8] {
    fn arg(&self) -> V<'_> {
        V::Blob(Cow::Borrowed(self))
    }
}
impl<T: Arg + ?Sized> Arg for &T {
    fn arg(&self) -> V<'_> {
        (**self).arg()
    }
}
impl<T: Arg> Arg for Option<T> {
    fn arg(&self) -> V<'_> {
        match self {
            Some(v) => v.arg(),
            None => V::Null,
        }
    }
}

/// Statement parameters: `args![a, b, c]` is `&[a.arg(), b.arg(), ...]`,
/// each borrowed, so a parameter is never moved into a statement.
#[macro_export]
macro_rules! args {
    () => { &[] as &[$crate::market::server::store::V] };
    ($($x:expr),+ $(,)?) => { &[$($crate::market::server::store::Arg::arg(&$x)),+] };
}
pub use crate::args;

/// Converting a column value to a Rust type.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> std::result::Result<Self, String>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            V::Int(i) => Ok(*i),
            other => Err(format!("expected an integer, found {other:?}")),
        }
    }
}
impl FromValue for u32 {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        let i = i64::from_value(v)?;
        u32::try_from(i).map_err(|_| format!("{i} is out of range for u32"))
    }
}
impl FromValue for u64 {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        let i = i64::from_value(v)?;
        u64::try_from(i).map_err(|_| format!("{i} is out of range for u64"))
    }
}
impl FromValue for bool {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        Ok(i64::from_value(v)? != 0)
    }
}
impl FromValue for f64 {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            V::Real(f) => Ok(*f),
            V::Int(i) => Ok(*i as f64),
            other => Err(format!("expected a number, found {other:?}")),
        }
    }
}
impl FromValue for String {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            V::Text(s) => Ok(s.to_string()),
            other => Err(format!("expected text, found {other:?}")),
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            V::Blob(b) => Ok(b.to_vec()),
            V::Text(s) => Ok(s.as_bytes().to_vec()),
            other => Err(format!("expected bytes, found {other:?}")),
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            V::Null => Ok(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<Value>);

impl Row {
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T> {
        let v = self.0.get(i).ok_or_else(|| DbError::Type(i, "no such column".into()))?;
        T::from_value(v).map_err(|e| DbError::Type(i, e))
    }
}

/// Which engine a [`Db`] talks to, for the few statements that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// A handle on an open transaction (or a read-only connection).
#[derive(Clone, Copy)]
pub enum Db<'a> {
    Sqlite(&'a rusqlite::Connection),
    Postgres(&'a postgres::PgConn),
}

impl<'a> Db<'a> {
    pub fn engine(&self) -> Engine {
        match self {
            Db::Sqlite(_) => Engine::Sqlite,
            Db::Postgres(_) => Engine::Postgres,
        }
    }

    /// Run a statement; the number of rows it changed.
    pub fn exec(&self, sql: &str, args: &[V]) -> Result<u64> {
        match self {
            Db::Sqlite(c) => sqlite::exec(c, sql, args),
            Db::Postgres(c) => c.exec(sql, args),
        }
    }

    /// Run a statement whose row count the caller does not need. On
    /// PostgreSQL it goes with the next statement that is answered (a
    /// read, a savepoint's release, the commit), in one round trip: its
    /// failure is that statement's. SQLite runs it at once.
    pub fn write(&self, sql: &str, args: &[V]) -> Result<()> {
        match self {
            Db::Sqlite(c) => sqlite::exec(c, sql, args).map(|_| ()),
            Db::Postgres(c) => c.write(sql, args),
        }
    }

    /// [`Db::write`] for a statement independent of the write queued just
    /// before it: it neither reads nor changes a row that write changes.
    /// On PostgreSQL the two are sent as one statement (`WITH w0 AS
    /// (first) second`, both seeing the same snapshot), which saves the
    /// database a statement's fixed cost (its bind, executor start and
    /// answer); their failure is the pair's. Anything else queued before it
    /// (a read, a control statement, one with a `WITH` of its own) and
    /// SQLite run it as [`Db::write`] does.
    pub fn write_beside(&self, sql: &str, args: &[V]) -> Result<()> {
        match self {
            Db::Sqlite(c) => sqlite::exec(c, sql, args).map(|_| ()),
            Db::Postgres(c) => c.write_beside(sql, args),
        }
    }

    /// Every row of a query.
    pub fn rows(&self, sql: &str, args: &[V]) -> Result<Vec<Row>> {
        match self {
            Db::Sqlite(c) => sqlite::rows(c, sql, args),
            Db::Postgres(c) => c.rows(sql, args),
        }
    }

    /// Every row of each query, in order. They run one after another, as
    /// if asked for one by one, but on PostgreSQL they travel together, in
    /// one round trip: for reads that do not wait on each other's answers.
    pub fn rows_each(&self, queries: &[(&str, &[V])]) -> Result<Vec<Vec<Row>>> {
        match self {
            Db::Sqlite(c) => queries.iter().map(|(sql, args)| sqlite::rows(c, sql, args)).collect(),
            Db::Postgres(c) => c.rows_each(queries),
        }
    }

    /// Every row of a query, each turned into a `T`.
    pub fn map<T>(&self, sql: &str, args: &[V], f: impl FnMut(&Row) -> Result<T>) -> Result<Vec<T>> {
        self.rows(sql, args)?.iter().map(f).collect()
    }

    /// The first row, if any, turned into a `T`.
    pub fn first<T>(&self, sql: &str, args: &[V], f: impl FnOnce(&Row) -> Result<T>) -> Result<Option<T>> {
        match self.rows(sql, args)?.first() {
            Some(r) => f(r).map(Some),
            None => Ok(None),
        }
    }

    /// The first column of the first row, if any.
    pub fn value<T: FromValue>(&self, sql: &str, args: &[V]) -> Result<Option<T>> {
        self.first(sql, args, |r| r.get(0))
    }

    /// An aggregate's single integer (`COUNT(*)`, a cast sum); 0 on no row
    /// or NULL.
    pub fn count(&self, sql: &str, args: &[V]) -> Result<i64> {
        Ok(self.value::<Option<i64>>(sql, args)?.flatten().unwrap_or(0))
    }

    /// Whether the query returns any row.
    pub fn exists(&self, sql: &str, args: &[V]) -> Result<bool> {
        Ok(!self.rows(sql, args)?.is_empty())
    }

    /// Appended to a query whose rows the caller goes on to change on what
    /// it read: on PostgreSQL they are locked until the batch commits (a
    /// replica deciding on the same rows waits, then reads the change), on
    /// SQLite there is one writer and nothing to add.
    pub fn for_update(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "",
            Db::Postgres(_) => " FOR UPDATE",
        }
    }

    /// Like [`Db::for_update`], but rows another batch holds are passed
    /// over: for work that any one replica may do, such as the clock's.
    pub fn skip_locked(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "",
            Db::Postgres(_) => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// Insert one row into `table` (whose key is an `id` the database
    /// numbers) and say how the statements that follow in this
    /// transaction name that id. On PostgreSQL the insert is queued like
    /// [`Db::write`] and the id is its sequence's value on this connection
    /// (`currval`), so nothing waits for an answer; SQLite answers at once.
    pub fn insert_id(&self, table: &str, sql: &str, args: &[V]) -> Result<NewId> {
        match self {
            Db::Sqlite(_) => Ok(NewId::Value(self.count(&format!("{sql} RETURNING id"), args)?)),
            Db::Postgres(c) => {
                c.write(sql, args)?;
                Ok(NewId::Sql(format!("currval('{table}_id_seq')")))
            }
        }
    }

    /// How many rows this connection's statements have changed so far (on
    /// PostgreSQL a write not waited for counts as one): a step that leaves
    /// it as it was wrote nothing, so failing changed nothing either.
    pub fn changes(&self) -> u64 {
        match self {
            Db::Sqlite(c) => c.total_changes(),
            Db::Postgres(c) => c.changes(),
        }
    }

    /// Open a savepoint on the current transaction: dropped without
    /// [`Savepoint::commit`] it rolls back to where it began, so a refused
    /// request changes nothing while its neighbours in the batch commit.
    pub fn savepoint(&self) -> Result<Savepoint<'a>> {
        self.write("SAVEPOINT op", &[])?;
        Ok(Savepoint { db: *self, done: false })
    }
}

/// The `VALUES` list of a many-row insert: `rows` groups of `width`
/// placeholders numbered from `?first`, each group starting with `lead`
/// (SQL shared by every row, or nothing): `value_rows("", 1, 2, 2)` is
/// `(?1, ?2), (?3, ?4)`.
pub fn value_rows(lead: &str, first: usize, rows: usize, width: usize) -> String {
    (0..rows)
        .map(|r| {
            let ps: Vec<String> = (0..width).map(|c| format!("?{}", first + r * width + c)).collect();
            format!("({lead}{})", ps.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The id of a row [`Db::insert_id`] wrote: the number, or SQL that
/// names it (a statement's text stays the same from row to row either
/// way, so it is prepared once).
pub enum NewId {
    Value(i64),
    Sql(String),
}

/// A savepoint on a shared transaction (see [`Db::savepoint`]).
pub struct Savepoint<'a> {
    db: Db<'a>,
    done: bool,
}

impl<'a> Savepoint<'a> {
    pub fn db(&self) -> Db<'a> {
        self.db
    }

    /// Keep what was done since the savepoint. On PostgreSQL this is where
    /// the savepoint's queued writes are answered: if one failed, all of
    /// it is rolled back and that failure returned.
    pub fn commit(mut self) -> Result<()> {
        self.db.exec("RELEASE SAVEPOINT op", &[])?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Savepoint<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = match self.db {
                Db::Sqlite(_) => self
                    .db
                    .exec("ROLLBACK TO SAVEPOINT op", &[])
                    .and_then(|_| self.db.exec("RELEASE SAVEPOINT op", &[])),
                Db::Postgres(c) => c.rollback_to_savepoint().map(|()| 0),
            };
        }
    }
}

/// The writer's connection, to either engine.
pub enum Store {
    Sqlite(rusqlite::Connection),
    Postgres(Box<postgres::PgConn>),
}

impl Store {
    /// Open `spec` for writing, migrating it, outside any async runtime
    /// (for the command-line tools beside a running coordinator).
    pub fn open(spec: &DbSpec) -> Result<Store> {
        match spec {
            DbSpec::Sqlite(p) => Ok(Store::Sqlite(sqlite::open(p, true)?)),
            DbSpec::Postgres(url) => Ok(Store::Postgres(Box::new(postgres::PgConn::open(url)?))),
        }
    }

    /// Open `spec` to read, without migrating (`market ledger`).
    pub fn open_read(spec: &DbSpec) -> Result<Store> {
        match spec {
            DbSpec::Sqlite(p) => Ok(Store::Sqlite(sqlite::open_read(p)?)),
            DbSpec::Postgres(url) => {
                let pg = postgres::PgConn::connect(url)?;
                if pg.schema_version()? == 0 {
                    return Err(DbError::Schema(
                        "this PostgreSQL database holds no market yet: start `market serve --db` on it first".into(),
                    ));
                }
                Ok(Store::Postgres(Box::new(pg)))
            }
        }
    }

    /// Begin a read-only transaction that sees one consistent snapshot,
    /// while a coordinator may be writing.
    pub fn begin_snapshot(&mut self) -> Result<()> {
        let sql = match self {
            Store::Sqlite(_) => "BEGIN",
            Store::Postgres(_) => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        };
        self.db().exec(sql, &[]).map(|_| ())
    }

    pub fn db(&self) -> Db<'_> {
        match self {
            Store::Sqlite(c) => Db::Sqlite(c),
            Store::Postgres(c) => Db::Postgres(c),
        }
    }

    /// Begin the batch's transaction. SQLite has one writer; on
    /// PostgreSQL the batches of all replicas run at once, and the rows a
    /// decision rests on are locked as they are read ([`Db::for_update`]),
    /// so a task is accepted once and a balance spent once, whichever
    /// replica each request came through.
    pub fn begin(&mut self) -> Result<()> {
        match self {
            Store::Sqlite(c) => c.execute_batch("BEGIN IMMEDIATE").map_err(Into::into),
            Store::Postgres(c) => c.begin(),
        }
    }

    pub fn commit(&mut self) -> Result<()> {
        self.commit_and_notify(&[])
    }

    /// Commit, then (on PostgreSQL) notify `channels`, outside the batch's
    /// transaction (see [`postgres::PgConn::commit_and_notify`]).
    pub fn commit_and_notify(&mut self, channels: &[String]) -> Result<()> {
        let r = match self {
            Store::Sqlite(c) => sqlite::exec(c, "COMMIT", &[]).map(|_| ()),
            Store::Postgres(c) => c.commit_and_notify(channels),
        };
        if r.is_err() {
            self.rollback();
        }
        r
    }

    pub fn rollback(&mut self) {
        match self {
            Store::Sqlite(c) => {
                let _ = sqlite::exec(c, "ROLLBACK", &[]);
            }
            Store::Postgres(c) => c.rollback(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::value_rows;

    #[test]
    fn value_rows_numbers_every_placeholder_once_after_the_lead() {
        assert_eq!(value_rows("", 1, 2, 2), "(?1, ?2), (?3, ?4)");
        assert_eq!(value_rows("x, ", 2, 2, 2), "(x, ?2, ?3), (x, ?4, ?5)");
        assert_eq!(value_rows("", 1, 1, 4), "(?1, ?2, ?3, ?4)");
    }
}
