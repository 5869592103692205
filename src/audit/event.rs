//! Every kind of event the audit log holds, by name.
//!
//! The names are part of the log's format (DESIGN.md section 5): they are
//! written here once, and every writer and reader (analytics, the report,
//! recovery) uses the enum, so a misspelt event is a compile error. An
//! event's fields stay a JSON object, written by the operation that owns it.
//! This module must not know how the log is stored.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! events {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// One kind of audit event.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Event {
            $($(#[$doc])* $variant,)*
        }

        impl Event {
            /// Every kind, in the order declared.
            pub const ALL: &'static [Event] = &[$(Event::$variant,)*];

            /// The name written in the log.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Event::$variant => $name,)*
                }
            }

            /// The kind a logged name stands for; `None` for a name this
            /// build does not write (an older or newer log).
            pub fn parse(name: &str) -> Option<Event> {
                match name {
                    $($name => Some(Event::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

events! {
    /// The first line of a log.
    LogGenesis = "log.genesis",
    /// A torn tail was settled after a crash.
    LogRecovered = "log.recovered",
    /// A witness countersigned a checkpoint.
    AuditAnchored = "audit.anchored",
    /// Recovery completed a change a crash interrupted.
    ChangeCompleted = "change.completed",
    /// A change's events are void: it was never applied.
    ChangeAborted = "change.aborted",
    ConfigChanged = "config.changed",
    ConsentGranted = "consent.granted",
    ConsentRevoked = "consent.revoked",
    ConsentJobsStopped = "consent.jobs_stopped",
    JobApproved = "job.approved",
    JobDenied = "job.denied",
    JobStarted = "job.started",
    JobCompleted = "job.completed",
    JobFailed = "job.failed",
    JobKilled = "job.killed",
    JobCancelled = "job.cancelled",
    UsageReclaimed = "usage.reclaimed",
    WorkspaceApplied = "workspace.applied",
    KeyCreated = "key.created",
    KeyRotated = "key.rotated",
    KeyRemoved = "key.removed",
    KeyImported = "key.imported",
    MarketAdvertise = "market.advertise",
    MarketWithdraw = "market.withdraw",
    MarketOffer = "market.offer",
    MarketApproved = "market.approved",
    MarketDeclined = "market.declined",
    MarketAccept = "market.accept",
    MarketPayloadRefused = "market.payload_refused",
    MarketDelivered = "market.delivered",
    MarketAbandoned = "market.abandoned",
    MarketLapsed = "market.lapsed",
    MarketBid = "market.bid",
    MarketRaise = "market.raise",
    MarketSettled = "market.settled",
    MarketRefunded = "market.refunded",
    MarketResultRejected = "market.result_rejected",
    /// The requester's acceptance check of a workspace task's changes.
    MarketAcceptance = "market.acceptance",
    /// The requester rejected a delivery it opened, with its reason's text.
    MarketRejected = "market.rejected",
    /// A provider's delivery was rejected; the requester's reason, verified.
    MarketRejectionReceived = "market.rejection_received",
    MarketGranted = "market.granted",
}

impl Event {
    /// A job's terminal event (completed, failed, killed or cancelled).
    pub fn is_job_end(self) -> bool {
        matches!(
            self,
            Event::JobCompleted | Event::JobFailed | Event::JobKilled | Event::JobCancelled
        )
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Event, D::Error> {
        let name = String::deserialize(d)?;
        Event::parse(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown audit event `{name}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        let mut seen = std::collections::BTreeSet::new();
        for e in Event::ALL {
            assert!(seen.insert(e.name()), "{} twice", e.name());
            assert_eq!(Event::parse(e.name()), Some(*e));
            let json = serde_json::to_string(e).unwrap();
            assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), *e);
        }
        assert_eq!(Event::parse("job.unknown"), None);
    }
}
