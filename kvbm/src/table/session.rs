//! Sessions, reservations and leases: who may write a reserved slot, who
//! keeps a block from eviction, and until when.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::index::Key;

/// Who owns a session. Only the owner may use it: a session's slots are
/// mapped memory its owner writes, and its leases keep blocks from eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The daemon's own copying paths (Put, Get, Prefetch), one session per
    /// call; never reachable from a request.
    Daemon,
    /// The process at the other end of a pool-socket connection, as the
    /// kernel reports it (`SO_PEERCRED`). A pid the daemon cannot see (a
    /// peer in another pid namespace) reads as 0; such a claim still needs
    /// the session's random id.
    Process { pid: u32, uid: u32 },
}

/// A claim to a session: its id and who is asking. Every operation on a
/// session checks the claim against the owner under the table's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub id: u64,
    pub owner: Owner,
}

/// A block reserved for writing: its index entry and what the commit will
/// publish about it.
pub(crate) struct Reservation {
    pub id: u32,
    pub parent: Vec<u8>,
    pub tokens: Vec<u32>,
    pub deadline: Instant,
}

pub(crate) struct Lease {
    pub session: u64,
    pub ids: Vec<u32>,
    pub deadline: Instant,
}

pub(crate) struct SessionState {
    pub owner: Owner,
    /// The host pool the owner mapped (its slots' offsets are relative to
    /// it); `None` for the daemon's own sessions, which see every pool.
    pub pool: Option<u8>,
    pub reservations: HashMap<(u32, Key), Reservation>,
    pub leases: BTreeSet<u64>,
}

#[derive(Default)]
pub(crate) struct Sessions {
    pub open: HashMap<u64, SessionState>,
    pub leases: HashMap<u64, Lease>,
    pub next_lease: u64,
}

impl Sessions {
    /// Opens a session for `owner` under a random id: never 0, never one in
    /// use, so one id cannot be guessed from another and a restarted daemon
    /// never hands out an id an old client still holds.
    pub fn open(&mut self, owner: Owner, pool: Option<u8>) -> Session {
        let id = loop {
            let id = rand::random::<u64>();
            if id != 0 && !self.open.contains_key(&id) {
                break id;
            }
        };
        self.open.insert(
            id,
            SessionState {
                owner,
                pool,
                reservations: HashMap::new(),
                leases: BTreeSet::new(),
            },
        );
        Session { id, owner }
    }

    /// The session the claim owns. An unknown id and someone else's id get
    /// the same answer, so the error tells an attacker nothing.
    pub fn check(&self, session: Session) -> Result<()> {
        match self.open.get(&session.id) {
            Some(s) if s.owner == session.owner => Ok(()),
            _ => Err(Error::not_found(format!(
                "unknown session {}: attach the pool socket first (sessions \
                 belong to the process that opened them)",
                session.id
            ))),
        }
    }

    /// The host pool of a checked session (`None`: every pool).
    pub fn pool(&self, session: u64) -> Option<u8> {
        self.open.get(&session).and_then(|s| s.pool)
    }

    /// Takes the reservation of `(ns, key)` out of a checked session.
    pub fn take_reservation(&mut self, session: u64, ns: u32, key: Key) -> Option<Reservation> {
        self.open
            .get_mut(&session)
            .and_then(|s| s.reservations.remove(&(ns, key)))
    }

    /// Records a lease of `ids` for a checked session; returns its id.
    pub fn add_lease(&mut self, session: u64, ids: Vec<u32>, deadline: Instant) -> u64 {
        self.next_lease += 1;
        let lease = self.next_lease;
        self.leases.insert(
            lease,
            Lease {
                session,
                ids,
                deadline,
            },
        );
        if let Some(s) = self.open.get_mut(&session) {
            s.leases.insert(lease);
        }
        lease
    }

    /// Removes a lease owned by `session`; `None` when it is not its own.
    pub fn take_lease(&mut self, session: u64, lease: u64) -> Option<Lease> {
        if self.leases.get(&lease)?.session != session {
            return None;
        }
        if let Some(s) = self.open.get_mut(&session) {
            s.leases.remove(&lease);
        }
        self.leases.remove(&lease)
    }

    /// Removes what expired by `now`: leases, and reservations' entry ids.
    pub fn take_expired(&mut self, now: Instant) -> (Vec<Lease>, Vec<u32>) {
        let expired: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        let mut leases = Vec::new();
        for id in expired {
            if let Some(l) = self.leases.remove(&id) {
                if let Some(s) = self.open.get_mut(&l.session) {
                    s.leases.remove(&id);
                }
                leases.push(l);
            }
        }
        let mut reserved = Vec::new();
        for s in self.open.values_mut() {
            s.reservations.retain(|_, r| {
                let live = r.deadline > now;
                if !live {
                    reserved.push(r.id);
                }
                live
            });
        }
        (leases, reserved)
    }
}
