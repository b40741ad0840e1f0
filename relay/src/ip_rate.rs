//! New connections per IP address: a token bucket per address, checked when a connection comes
//! in and before its handshake, so that a peer opening connections in a loop (each with a fresh
//! identity) costs the relay an accept and a close, not a Noise handshake each.
//!
//! Established connections are not affected: a node keeps its one connection to its home
//! relay. Limits: [`Config::new_connections_per_ip_per_sec`](crate::Config) and
//! [`Config::new_connection_burst_per_ip`](crate::Config); a refusal is counted as
//! `limit_hits{limit="connections_per_ip_rate"}`.

use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};
use std::time::Instant;

use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

use crate::mailbox::rate::RateLimiter;

/// A connection refused because its address opened too many lately.
#[derive(Debug, thiserror::Error)]
#[error("too many new connections from {0}")]
pub struct TooFast(pub IpAddr);

/// The behaviour: refuses pending inbound connections beyond the rate of their IP address.
#[derive(Debug)]
pub struct Behaviour {
    limiter: RateLimiter<IpAddr>,
    start: Instant,
}

impl Behaviour {
    /// `per_sec` new connections a second per address, `burst` at once.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self {
            limiter: RateLimiter::new(per_sec, burst),
            start: Instant::now(),
        }
    }

    fn admit(&mut self, remote: &Multiaddr) -> Result<(), ConnectionDenied> {
        let Some(ip) = ip_of(remote) else {
            return Ok(());
        };
        let now_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        if self.limiter.check(&ip, now_ms) {
            Ok(())
        } else {
            Err(ConnectionDenied::new(TooFast(ip)))
        }
    }
}

/// The IP address a multiaddr starts with, if it does.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.admit(remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
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
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_beyond_its_burst_is_refused_and_others_are_not() {
        let mut rate = Behaviour::new(1, 3);
        let a: Multiaddr = "/ip4/10.0.0.1/tcp/4001".parse().expect("addr");
        let b: Multiaddr = "/ip6/::1/tcp/4001".parse().expect("addr");
        for _ in 0..3 {
            assert!(rate.admit(&a).is_ok());
        }
        let refused = rate.admit(&a).expect_err("beyond the burst");
        assert!(refused.downcast_ref::<TooFast>().is_some());
        assert!(rate.admit(&b).is_ok());
        // Not an IP address (a relayed circuit, say): not this limit's business.
        let circuit: Multiaddr = "/p2p-circuit".parse().expect("addr");
        assert!(rate.admit(&circuit).is_ok());
    }
}
