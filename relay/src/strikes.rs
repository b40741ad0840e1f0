//! Peers that keep sending requests that do not decode are shut out for a while.
//!
//! A well-behaved node never sends a malformed request, so a handful of them is a fault and a
//! stream of them is an attack: each one still costs the relay a stream, a decode attempt and an
//! answer. Every malformed request takes a token from its peer's bucket
//! ([`Config::malformed_request_burst_per_peer`](crate::Config), refilled at
//! [`Config::malformed_requests_per_peer_per_sec`](crate::Config)); a peer with none left is
//! banned for [`Config::ban_secs`](crate::Config): its connections are closed at once and new
//! ones are refused as soon as its identity is known (after the handshake, counted as
//! `limit_hits{limit="banned_peer"}`). A peer that comes back under a fresh identity starts with
//! a full bucket, but every new connection also passes the per-IP rate ([`crate::ip_rate`]).
//!
//! Requests that decode and are refused (a full mailbox, a quota) are not strikes: they are
//! answered with the refusal and its `retry_after_ms`. Coming back for the same recipient
//! before that wait is over is one ([`crate::mailbox::waits`]): a node never does, and each
//! such retry costs the relay as much as a malformed request. Nor is a frame refused because the
//! relay's read budget was spent (`Busy`): that is the relay's load, not the peer's fault
//! ([`is_strike`]).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use kith_protocol::Reject;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    dummy, CloseConnection, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

use crate::mailbox::rate::RateLimiter;

/// Most peers banned at once; beyond it the ban that ends first is dropped early.
const MAX_BANNED: usize = 10_000;

/// Whether a request refused as undecodable for `reason` counts against its peer: a malformed
/// or oversized frame does; one the relay had no room to read (`Busy`) does not.
pub fn is_strike(reason: &Reject) -> bool {
    matches!(reason, Reject::Malformed | Reject::TooLarge { .. })
}

/// A connection refused because its peer is banned.
#[derive(Debug, thiserror::Error)]
#[error("peer {0} is banned for sending malformed requests or ignoring retry_after_ms")]
pub struct Banned(pub PeerId);

/// The behaviour: counts strikes, closes a banned peer's connections and refuses new ones.
#[derive(Debug)]
pub struct Behaviour {
    strikes: RateLimiter<PeerId>,
    ban_for: Duration,
    banned: HashMap<PeerId, Instant>,
    start: Instant,
    to_close: VecDeque<PeerId>,
}

impl Behaviour {
    /// `per_sec` malformed requests a second per peer sustained, `burst` at once; a peer beyond
    /// them is banned for `ban_for`.
    pub fn new(per_sec: u32, burst: u32, ban_for: Duration) -> Self {
        Self {
            strikes: RateLimiter::new(per_sec, burst),
            ban_for,
            banned: HashMap::new(),
            start: Instant::now(),
            to_close: VecDeque::new(),
        }
    }

    /// Counts a malformed request of `peer`: `true` when this one got it banned (its
    /// connections are then being closed).
    pub fn strike(&mut self, peer: PeerId) -> bool {
        self.strike_at(peer, Instant::now())
    }

    fn strike_at(&mut self, peer: PeerId, now: Instant) -> bool {
        if self.is_banned(&peer, now) {
            return false;
        }
        let now_ms = u64::try_from(now.duration_since(self.start).as_millis()).unwrap_or(u64::MAX);
        if self.strikes.check(&peer, now_ms) {
            if self.strikes.tracked() > MAX_BANNED {
                self.strikes.prune(now_ms);
            }
            return false;
        }
        if self.banned.len() >= MAX_BANNED {
            self.banned.retain(|_, until| *until > now);
            if self.banned.len() >= MAX_BANNED {
                if let Some(first) = self.banned.iter().min_by_key(|(_, u)| **u).map(|(p, _)| *p) {
                    self.banned.remove(&first);
                }
            }
        }
        self.banned.insert(peer, now + self.ban_for);
        self.to_close.push_back(peer);
        true
    }

    /// Whether `peer` is banned at `now` (an ended ban is forgotten).
    fn is_banned(&mut self, peer: &PeerId, now: Instant) -> bool {
        match self.banned.get(peer) {
            Some(until) if *until > now => true,
            Some(_) => {
                self.banned.remove(peer);
                false
            }
            None => false,
        }
    }

    fn admit(&mut self, peer: PeerId) -> Result<(), ConnectionDenied> {
        if self.is_banned(&peer, Instant::now()) {
            Err(ConnectionDenied::new(Banned(peer)))
        } else {
            Ok(())
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.admit(peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.admit(peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _event: FromSwarm<'_>) {}

    fn on_connection_handler_event(
        &mut self,
        _peer_id: PeerId,
        _connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.to_close.pop_front() {
            Some(peer_id) => Poll::Ready(ToSwarm::CloseConnection {
                peer_id,
                connection: CloseConnection::All,
            }),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_beyond_its_burst_is_banned_until_the_ban_ends_and_others_are_not() {
        let mut strikes = Behaviour::new(1, 3, Duration::from_secs(60));
        let bad = PeerId::random();
        let other = PeerId::random();
        let now = strikes.start;
        for _ in 0..3 {
            assert!(!strikes.strike_at(bad, now), "within the burst");
        }
        assert!(
            strikes.strike_at(bad, now),
            "the strike beyond the burst bans"
        );
        assert_eq!(
            strikes.to_close.pop_front(),
            Some(bad),
            "its connections close"
        );
        assert!(
            !strikes.strike_at(bad, now),
            "a banned peer is not banned twice"
        );
        assert!(strikes.is_banned(&bad, now + Duration::from_secs(59)));
        let refused = strikes.admit(bad).expect_err("a banned peer is refused");
        assert!(refused.downcast_ref::<Banned>().is_some());
        assert!(strikes.admit(other).is_ok());
        assert!(
            !strikes.strike_at(other, now),
            "each peer has its own bucket"
        );
        assert!(
            !strikes.is_banned(&bad, now + Duration::from_secs(60)),
            "the ban ends"
        );
        assert!(strikes.admit(bad).is_ok());
    }

    #[test]
    fn only_the_peers_own_faults_are_strikes() {
        assert!(is_strike(&Reject::Malformed));
        assert!(is_strike(&Reject::TooLarge { max: 64 }));
        assert!(!is_strike(&Reject::Busy {
            retry_after_ms: 200
        }));
    }

    #[test]
    fn the_ban_list_stays_bounded() {
        let mut strikes = Behaviour::new(1, 1, Duration::from_secs(60));
        let now = strikes.start;
        for _ in 0..MAX_BANNED + 10 {
            let peer = PeerId::random();
            strikes.strike_at(peer, now);
            strikes.strike_at(peer, now);
        }
        assert!(strikes.banned.len() <= MAX_BANNED);
    }
}
