//! Admission: every connection takes a [`Slot`] under `--max-connections`
//! before a byte of it is read; until its node authenticates it also
//! counts under `--max-unauth` and `--max-unauth-per-addr` (an IPv6 peer
//! by its /64). A slot is given back when it is dropped.
//!
//! It must not read or write the connection: it only counts.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::metrics::{Metrics, Refused};
use super::options::Limits;

/// The connection limits, shared by every connection.
pub struct Admission {
    limits: Limits,
    metrics: Arc<Metrics>,
    open: AtomicUsize,
    unauth: Mutex<Unauth>,
}

#[derive(Default)]
struct Unauth {
    total: usize,
    by_addr: HashMap<IpAddr, usize>,
}

/// One connection's place under the limits, given back on drop.
pub struct Slot {
    adm: Arc<Admission>,
    addr: IpAddr,
    authenticated: AtomicBool,
}

/// The address a peer is counted under: IPv6 peers by their /64, since one
/// host commonly holds a whole /64.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

impl Admission {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            metrics,
            open: AtomicUsize::new(0),
            unauth: Mutex::default(),
        })
    }

    /// A slot for a connection from `ip`, or the limit it is over.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Arc<Slot>, Refused> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.limits.max_connections {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Connections);
        }
        let addr = peer_key(ip);
        let admitted = match self.unauth.lock() {
            Ok(mut u) => {
                let here = u.by_addr.get(&addr).copied().unwrap_or(0);
                if u.total >= self.limits.max_unauth {
                    Err(Refused::Unauthenticated)
                } else if here >= self.limits.max_unauth_per_addr {
                    Err(Refused::PerAddress)
                } else {
                    u.total += 1;
                    u.by_addr.insert(addr, here + 1);
                    Ok(())
                }
            }
            Err(_) => Err(Refused::Unauthenticated),
        };
        if let Err(r) = admitted {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(r);
        }
        self.metrics.connections.inc();
        Ok(Arc::new(Slot {
            adm: self.clone(),
            addr,
            authenticated: AtomicBool::new(false),
        }))
    }

    fn release_unauth(&self, addr: IpAddr) {
        if let Ok(mut u) = self.unauth.lock() {
            u.total = u.total.saturating_sub(1);
            if let Some(n) = u.by_addr.get_mut(&addr) {
                *n -= 1;
                if *n == 0 {
                    u.by_addr.remove(&addr);
                }
            }
        }
    }
}

impl Slot {
    /// The node logged in: the connection no longer counts as unauthenticated.
    pub fn authenticated(&self) {
        if !self.authenticated.swap(true, Ordering::Relaxed) {
            self.adm.release_unauth(self.addr);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.authenticated.load(Ordering::Relaxed) {
            self.adm.release_unauth(self.addr);
        }
        self.adm.open.fetch_sub(1, Ordering::Relaxed);
        self.adm.metrics.connections.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: usize, max_unauth: usize, per_addr: usize) -> Limits {
        Limits {
            max_connections,
            max_unauth,
            max_unauth_per_addr: per_addr,
            ..Limits::default()
        }
    }

    #[test]
    fn slots_count_under_every_limit_and_are_given_back() {
        let adm = Admission::new(limits(3, 2, 1), Arc::new(Metrics::new("test")));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let s1 = adm.admit(a).unwrap();
        assert_eq!(adm.admit(a).err(), Some(Refused::PerAddress));
        let s2 = adm.admit(b).unwrap();
        assert_eq!(adm.admit(c).err(), Some(Refused::Unauthenticated));
        // Authenticated connections count only under the global limit.
        s1.authenticated();
        s2.authenticated();
        let s3 = adm.admit(a).unwrap();
        assert_eq!(adm.admit(c).err(), Some(Refused::Connections));
        drop((s1, s3));
        let _s4 = adm.admit(c).unwrap();
        let _s5 = adm.admit(a).unwrap();
        drop(s2);
        assert_eq!(adm.open.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn ipv6_peers_count_by_their_64() {
        let adm = Admission::new(limits(10, 10, 1), Arc::new(Metrics::new("test")));
        let _s = adm.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(
            adm.admit("2001:db8::2".parse().unwrap()).err(),
            Some(Refused::PerAddress)
        );
        assert!(adm.admit("2001:db8:0:1::1".parse().unwrap()).is_ok());
        let _m = adm.admit("::ffff:10.0.0.9".parse().unwrap()).unwrap();
        assert_eq!(adm.admit("10.0.0.9".parse().unwrap()).err(), Some(Refused::PerAddress));
    }
}
