//! The rules the coordinator runs its market by ([`BookRules`], set by
//! `market serve` flags) and the fixed bounds every handler checks
//! against.
//!
//! It must not hold state: only settings and constants.

/// The rules the coordinator runs its market by: grants, leases, grace
/// periods, attempts, settle deadlines and cool-downs.
#[derive(Debug, Clone)]
pub struct BookRules {
    /// RUV credited once to every new node. 0 by default: a free grant per
    /// identity is minted by anyone who makes keypairs, so an open market
    /// funds nodes with `market grant` instead (see PROTOCOL.md, "Money").
    pub initial_grant: i64,
    /// A lease lasts this long past the last accept or heartbeat.
    pub lease_ms: i64,
    /// A disconnected provider's offers survive this long.
    pub grace_ms: i64,
    /// Attempts a task gets when the requester does not say.
    pub default_attempts: u32,
    /// A delivered task the requester neither settles nor rejects within
    /// this long is settled for it (and its stored result dropped).
    pub settle_ttl_ms: i64,
    /// A provider that gave up or lost a lease through its own fault takes
    /// no new lease for this long.
    pub cooldown_ms: i64,
    /// A requester must relay the payload within this long of the accept;
    /// a lease that ends without one after it is not the provider's fault.
    pub payload_grace_ms: i64,
}

impl Default for BookRules {
    fn default() -> Self {
        BookRules {
            initial_grant: 0,
            lease_ms: 30_000,
            grace_ms: 30_000,
            default_attempts: 3,
            settle_ttl_ms: DEFAULT_SETTLE_TTL_MS,
            cooldown_ms: DEFAULT_COOLDOWN_MS,
            payload_grace_ms: DEFAULT_PAYLOAD_GRACE_MS,
        }
    }
}

/// Default settle deadline for delivered tasks: a day.
pub const DEFAULT_SETTLE_TTL_MS: i64 = 24 * 3600 * 1000;
/// Default cool-down after a provider's own failure: a minute.
pub const DEFAULT_COOLDOWN_MS: i64 = 60_000;
/// Default time a requester has to relay the payload after an accept.
pub const DEFAULT_PAYLOAD_GRACE_MS: i64 = 30_000;
/// A lapse at the task's deadline counts against the provider only if its
/// attempt had at least this long between the accept and the deadline.
pub const MIN_WORK_MS: i64 = 60_000;
/// Largest operator grant in one `market grant`.
pub const MAX_GRANT: i64 = 1_000_000_000;
/// How long an applied message id is remembered.
pub const ID_RETENTION_MS: i64 = 24 * 3600 * 1000;
/// Most attempts a requester may ask for.
pub const MAX_ATTEMPTS: u32 = 10;
pub const MAX_PRICE: u64 = 1_000_000_000;
pub const MAX_MODELS: usize = 16;
pub const MAX_NAME: usize = 64;
/// Providers told about one task at most (the first valid accept wins anyway).
pub const FANOUT: usize = 64;
/// Rows the clock handles per batch, so one batch stays short.
pub const TICK_ROWS: i64 = 256;
