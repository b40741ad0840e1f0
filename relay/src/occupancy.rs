//! What the circuit relay holds now: reservations (by peer) and circuits (by source and
//! destination), kept from the relay's events and from the connections that close. A closing
//! reported twice (libp2p reports a circuit closed both by its handler and when a connection
//! under it closes) or for something never counted changes nothing, so the gauges built on it
//! are never negative.

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;

/// Reservations and circuits held.
#[derive(Debug, Default)]
pub struct Occupancy {
    reservations: HashSet<PeerId>,
    circuits: HashMap<(PeerId, PeerId), usize>,
}

impl Occupancy {
    /// `peer` holds a reservation (new or renewed).
    pub fn reserved(&mut self, peer: PeerId) {
        self.reservations.insert(peer);
    }

    /// `peer`'s reservation closed or timed out.
    pub fn unreserved(&mut self, peer: &PeerId) {
        self.reservations.remove(peer);
    }

    /// A circuit from `src` to `dst` opened.
    pub fn circuit_opened(&mut self, src: PeerId, dst: PeerId) {
        *self.circuits.entry((src, dst)).or_default() += 1;
    }

    /// A circuit from `src` to `dst` closed.
    pub fn circuit_closed(&mut self, src: PeerId, dst: PeerId) {
        if let Some(open) = self.circuits.get_mut(&(src, dst)) {
            *open -= 1;
            if *open == 0 {
                self.circuits.remove(&(src, dst));
            }
        }
    }

    /// The relay's last connection to `peer` closed: its reservation and every circuit from
    /// or to it are gone with it.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.reservations.remove(peer);
        self.circuits
            .retain(|(src, dst), _| src != peer && dst != peer);
    }

    /// Reservations held.
    pub fn reservations(&self) -> i64 {
        i64::try_from(self.reservations.len()).unwrap_or(i64::MAX)
    }

    /// Circuits open.
    pub fn circuits(&self) -> i64 {
        i64::try_from(self.circuits.values().sum::<usize>()).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    #[test]
    fn closings_reported_twice_or_late_never_go_below_zero() {
        let (alice, bob) = (peer(), peer());
        let mut held = Occupancy::default();
        held.reserved(alice);
        held.reserved(alice); // a renewal
        held.reserved(bob);
        held.circuit_opened(alice, bob);
        assert_eq!((held.reservations(), held.circuits()), (2, 1));

        // Bob stops: his connection closes, then the relay reports the circuit and the
        // reservation closed, the circuit twice.
        held.disconnected(&bob);
        held.circuit_closed(alice, bob);
        held.circuit_closed(alice, bob);
        held.unreserved(&bob);
        assert_eq!((held.reservations(), held.circuits()), (1, 0));
        // Alice's reservation times out and closes.
        held.unreserved(&alice);
        held.unreserved(&alice);
        assert_eq!((held.reservations(), held.circuits()), (0, 0));
    }

    #[test]
    fn two_circuits_between_the_same_peers_count_twice() {
        let (alice, bob) = (peer(), peer());
        let mut held = Occupancy::default();
        held.circuit_opened(alice, bob);
        held.circuit_opened(alice, bob);
        held.circuit_opened(bob, alice);
        held.circuit_closed(alice, bob);
        assert_eq!(held.circuits(), 2);
    }
}
