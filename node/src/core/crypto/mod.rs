//! End-to-end encryption of one-to-one bodies: the only place where they are sealed and opened.
//!
//! Every one-to-one body that carries content (text, file references with their key, receipts)
//! travels as a [`Body::Olm`](kith_protocol::Body::Olm): vodozemac's Olm (the double ratchet)
//! over the CBOR of the inner body, inside the signed envelope. The engine calls
//! [`Olm::seal`] on its way out (after [`Olm::start_session`] with a key claimed over
//! `/kith/keys/1` when there is no session yet) and [`Olm::open`] on its way in. Group
//! envelopes and group operations are not touched here.
//!
//! [`safety_number`] derives the number two people compare to verify each other.

pub mod mls;
pub mod olm;
pub mod order;
pub mod session;
pub mod verify;

pub use olm::{CryptoError, Olm, OpenError, PeerRecord};
pub(crate) use session::upgrade_entry;
pub use session::UNDECRYPTABLE_TEXT;

use kith_protocol::prekeys::SignedIdentity;

/// The context string of the safety number's key derivation (BLAKE3 `derive_key`).
const SAFETY_CONTEXT: &str = "kith 2026 safety number v1";

/// The 30 digits one side contributes: six groups of five, each a 40-bit slice of the BLAKE3
/// derivation over the side's peer id (which embeds its ed25519 key) and Olm identity key,
/// modulo 100,000 (as Signal does with its 60-digit numbers).
fn half(identity: &SignedIdentity) -> [u32; 6] {
    let peer = identity.peer.to_bytes();
    let mut hasher = blake3::Hasher::new_derive_key(SAFETY_CONTEXT);
    hasher.update(&[peer.len() as u8]);
    hasher.update(&peer);
    hasher.update(&identity.key);
    let digest = hasher.finalize();
    let bytes = digest.as_bytes();
    let mut groups = [0u32; 6];
    for (group, chunk) in groups.iter_mut().zip(bytes.chunks_exact(5)) {
        let value = chunk
            .iter()
            .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte));
        *group = (value % 100_000) as u32;
    }
    groups
}

/// The safety number of two identities: 60 digits in twelve groups of five, the same whichever
/// side computes it (the halves are ordered by peer id bytes).
pub fn safety_number(a: &SignedIdentity, b: &SignedIdentity) -> String {
    let (first, second) = if a.peer.to_bytes() <= b.peer.to_bytes() {
        (a, b)
    } else {
        (b, a)
    };
    half(first)
        .iter()
        .chain(half(second).iter())
        .map(|g| format!("{g:05}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::{Batch, Store};
    use kith_protocol::{Body, MessageId, PeerId};
    use libp2p::identity::Keypair;

    struct Side {
        olm: Olm,
        store: Store,
        peer: PeerId,
        /// Where its store is (kept for as long as the side).
        dir: tempfile::TempDir,
    }

    async fn side() -> Side {
        side_in(
            tempfile::tempdir().expect("tempdir"),
            Keypair::generate_ed25519(),
        )
    }

    /// A side of `key` whose store is (or goes) in `dir`.
    fn side_in(dir: tempfile::TempDir, key: Keypair) -> Side {
        let store = Store::open(dir.path()).expect("store");
        let peer = key.public().to_peer_id();
        let olm = Olm::load(store.clone(), key, Box::new(|_| {})).expect("account");
        Side {
            olm,
            store,
            peer,
            dir,
        }
    }

    fn chat(text: &str) -> Body {
        Body::Chat { text: text.into() }
    }

    /// Alice claims one of Bob's keys (as from a relay) and starts a session.
    fn connect(alice: &Side, bob: &Side) {
        let bundle = bob.olm.bundle(1).expect("bundle");
        alice
            .olm
            .start_session(&bob.peer, &bundle.identity, &bundle.one_time_keys[0], false)
            .expect("session");
    }

    /// `from` seals a chat message `text` for `to` on its session.
    fn say(from: &Side, to: &Side, text: &str) -> kith_protocol::envelope::Sealed {
        sealed(
            from.olm
                .seal(&to.peer, &chat(text))
                .expect("seals")
                .expect("a session"),
        )
    }

    fn sealed(body: Body) -> kith_protocol::envelope::Sealed {
        match body {
            Body::Olm(sealed) => sealed,
            other => panic!("not sealed: {other:?}"),
        }
    }

    fn open(
        to: &Side,
        from: &Side,
        s: &kith_protocol::envelope::Sealed,
    ) -> Result<Body, OpenError> {
        to.olm.open(
            from.peer_id(),
            &MessageId::random(),
            s,
            |body, _: &mut Batch| Ok::<_, OpenError>(body),
        )
    }

    impl Side {
        fn peer_id(&self) -> &PeerId {
            &self.peer
        }
    }

    #[tokio::test]
    async fn bodies_round_trip_and_the_plaintext_is_not_in_the_ciphertext() {
        let alice = side().await;
        let bob = side().await;
        connect(&alice, &bob);
        let first = say(&alice, &bob, "attack at dawn");
        assert_eq!(first.message_type, kith_protocol::envelope::OLM_PRE_KEY);
        assert!(first.identity.is_some());
        assert!(!first
            .ciphertext
            .windows(b"attack".len())
            .any(|w| w == b"attack"));
        assert_eq!(
            open(&bob, &alice, &first).expect("opens"),
            chat("attack at dawn")
        );
        // Bob answers on the session the pre-key message made; Alice's next ones are normal.
        let reply = say(&bob, &alice, "ok");
        assert_eq!(reply.message_type, kith_protocol::envelope::OLM_NORMAL);
        assert_eq!(open(&alice, &bob, &reply).expect("opens"), chat("ok"));
        let next = say(&alice, &bob, "again");
        assert_eq!(next.message_type, kith_protocol::envelope::OLM_NORMAL);
        assert_eq!(open(&bob, &alice, &next).expect("opens"), chat("again"));
        // A copy of an opened message does not open again (the engine knows it by its id).
        assert!(matches!(open(&bob, &alice, &next), Err(OpenError::KeyGone)));
        drop((alice.store, bob.store));
    }

    #[tokio::test]
    async fn a_captured_ciphertext_does_not_open_once_the_ratchet_moved_on() {
        let alice = side().await;
        let bob = side().await;
        connect(&alice, &bob);
        let hello = say(&alice, &bob, "hello");
        open(&bob, &alice, &hello).expect("opens");
        let reply = say(&bob, &alice, "hi");
        open(&alice, &bob, &reply).expect("opens");
        // The ciphertext an eavesdropper captures.
        let captured = say(&alice, &bob, "the secret");
        assert_eq!(
            open(&bob, &alice, &captured).expect("opens"),
            chat("the secret")
        );
        // The conversation goes on: both ratchets step forward.
        for i in 0..3 {
            let a = say(&bob, &alice, &format!("b{i}"));
            open(&alice, &bob, &a).expect("opens");
            let b = say(&alice, &bob, &format!("a{i}"));
            open(&bob, &alice, &b).expect("opens");
        }
        // Bob's whole state as it is now (in memory and as stored, reloaded from the store)
        // no longer opens the captured message.
        let stolen = Olm::load(
            bob.store.clone(),
            Keypair::generate_ed25519(),
            Box::new(|_| {}),
        )
        .expect("reload");
        for olm in [&bob.olm, &stolen] {
            let result = olm.open(&alice.peer, &MessageId::random(), &captured, |b, _| {
                Ok::<_, OpenError>(b)
            });
            assert!(result.is_err(), "the captured message opened again");
        }
    }

    /// A sealed message may leave before its session's new state is flushed, so a crash can
    /// lose a state already used: a session from before an unclean stop only opens from then
    /// on, and the next message claims a key for a new one. A clean stop keeps it sealing.
    #[tokio::test]
    async fn a_session_from_before_an_unclean_stop_never_seals_again() {
        use crate::core::store::tests::{close, copy_dir};
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let alice = side_in(tempfile::tempdir().expect("tempdir"), key.clone());
        let bob = side().await;
        connect(&alice, &bob);
        let hello = say(&alice, &bob, "hello");
        open(&bob, &alice, &hello).expect("opens");
        alice.store.flush().await.expect("flush");
        // Alice's node is killed: what is on disk comes back in a new process.
        let crashed = tempfile::tempdir().expect("tempdir");
        copy_dir(alice.dir.path(), crashed.path());
        let restarted = side_in(crashed, key.clone());
        assert!(!restarted.olm.has_session(&bob.peer).expect("sessions"));
        assert_eq!(
            restarted.olm.seal(&bob.peer, &chat("again")).expect("seal"),
            None
        );
        // Bob's messages on the old session still open.
        let reply = say(&bob, &restarted, "still here");
        assert_eq!(
            open(&restarted, &bob, &reply).expect("opens"),
            chat("still here")
        );
        assert_eq!(
            restarted.olm.seal(&bob.peer, &chat("again")).expect("seal"),
            None
        );
        // A new session (a key claimed again) seals, and Bob opens it.
        connect(&restarted, &bob);
        let again = say(&restarted, &bob, "again");
        assert_eq!(
            open(&bob, &restarted, &again).expect("opens"),
            chat("again")
        );
        // Stopped cleanly, the new session goes on sealing after a restart.
        let Side {
            olm, store, dir, ..
        } = restarted;
        drop(olm);
        close(store).await;
        let store = Store::open(dir.path()).expect("reopen");
        let reopened = Olm::load(store.clone(), key, Box::new(|_| {})).expect("account");
        assert!(reopened.has_session(&bob.peer).expect("sessions"));
        let later = sealed(
            reopened
                .seal(&bob.peer, &chat("later"))
                .expect("seal")
                .expect("a session"),
        );
        let opened = bob.olm.open(&peer, &MessageId::random(), &later, |b, _| {
            Ok::<_, OpenError>(b)
        });
        assert_eq!(opened.expect("opens"), chat("later"));
    }

    /// A message sealed with its session's new state left unwritten (it is on its way first):
    /// an open of the peer's message that fails, and so reloads the peer's sessions from the
    /// store, must not take the session back to before it, or the next message would reuse
    /// its key.
    #[tokio::test]
    async fn a_state_sealed_unwritten_survives_a_failed_open_of_the_peers_message() {
        let alice = side().await;
        let bob = side().await;
        connect(&alice, &bob);
        let hello = say(&alice, &bob, "hello");
        open(&bob, &alice, &hello).expect("opens");
        let unwritten = sealed(
            alice
                .olm
                .seal_unwritten(&bob.peer, &chat("unwritten"))
                .expect("seals")
                .expect("a session"),
        );
        // Bob's answer arrives and is refused after it decrypted: alice's sessions with bob
        // are reloaded from the store.
        let answer = say(&bob, &alice, "answer");
        let refused = alice
            .olm
            .open(&bob.peer, &MessageId::random(), &answer, |_, _| {
                Err::<(), _>(OpenError::BadInner("refused here".into()))
            });
        assert!(refused.is_err());
        let next = say(&alice, &bob, "next");
        assert_eq!(
            open(&bob, &alice, &unwritten).expect("opens"),
            chat("unwritten")
        );
        assert_eq!(open(&bob, &alice, &next).expect("opens"), chat("next"));
        // Written when asked, too: nothing is left to write.
        alice.olm.write_unwritten().expect("write");
    }

    #[tokio::test]
    async fn both_sides_starting_at_once_still_talk() {
        let alice = side().await;
        let bob = side().await;
        connect(&alice, &bob);
        connect(&bob, &alice);
        let from_alice = say(&alice, &bob, "a");
        let from_bob = say(&bob, &alice, "b");
        assert_eq!(open(&bob, &alice, &from_alice).expect("opens"), chat("a"));
        assert_eq!(open(&alice, &bob, &from_bob).expect("opens"), chat("b"));
        // Whatever session each side now picks, the other opens it.
        for i in 0..4 {
            let a = say(&alice, &bob, &format!("a{i}"));
            let b = say(&bob, &alice, &format!("b{i}"));
            assert_eq!(
                open(&bob, &alice, &a).expect("opens"),
                chat(&format!("a{i}"))
            );
            assert_eq!(
                open(&alice, &bob, &b).expect("opens"),
                chat(&format!("b{i}"))
            );
        }
    }

    #[tokio::test]
    async fn out_of_order_messages_open() {
        let alice = side().await;
        let bob = side().await;
        connect(&alice, &bob);
        let sent: Vec<_> = (0..5)
            .map(|i| say(&alice, &bob, &format!("m{i}")))
            .collect();
        for i in [3, 0, 4, 1, 2] {
            assert_eq!(
                open(&bob, &alice, &sent[i]).expect("opens"),
                chat(&format!("m{i}"))
            );
        }
    }

    /// The held messages of a peer, as [`Olm::ready`] lists them, opened.
    fn open_ready(to: &Side, from: &Side) -> Vec<Body> {
        let ready = to.olm.ready(from.peer_id()).expect("ready");
        let mut opened = Vec::new();
        for (key, bytes) in ready {
            let envelope: kith_protocol::Envelope =
                kith_protocol::cbor::decode(&bytes, 1 << 20).expect("envelope");
            let Ok(Body::Olm(s)) = envelope.body() else {
                panic!("not sealed");
            };
            opened.push(open(to, from, &s).expect("opens"));
            to.olm.forget_held(&key).expect("forget");
        }
        opened
    }

    #[tokio::test]
    async fn messages_far_ahead_of_their_chain_wait_and_open_in_order_or_after_patience() {
        use order::{Verdict, PATIENCE, WINDOW};
        let alice = side().await;
        let bob = side().await;
        connect(&alice, &bob);
        let count = 3 * WINDOW;
        let sent: Vec<_> = (0..count)
            .map(|i| say(&alice, &bob, &format!("m{i}")))
            .collect();
        let hold = |s: &kith_protocol::envelope::Sealed| {
            let envelope = kith_protocol::Envelope::seal(
                &Keypair::generate_ed25519(),
                kith_protocol::envelope::Header {
                    id: MessageId::random(),
                    to: kith_protocol::Destination::Peer(bob.peer),
                    sent_at_ms: 1,
                    lamport: 1,
                    expires_at_ms: None,
                },
                &Body::Olm(s.clone()),
            )
            .expect("envelope");
            let bytes = kith_protocol::cbor::encode(&envelope, 1 << 20).expect("encode");
            assert!(bob
                .olm
                .hold(&alice.peer, &envelope.id, s, bytes, 1_000)
                .expect("holds"));
        };
        // The last ones come first: too far ahead, they wait.
        let far = (count - 1) as usize;
        assert_eq!(
            bob.olm.verdict(&alice.peer, &sent[far]).expect("verdict"),
            Verdict::Hold
        );
        for s in &sent[(2 * WINDOW as usize)..] {
            hold(s);
        }
        assert!(open_ready(&bob, &alice).is_empty());
        // The first two windows come, in order: the held ones come into the window and open.
        for (i, s) in sent.iter().enumerate().take(2 * WINDOW as usize) {
            assert_eq!(
                bob.olm.verdict(&alice.peer, s).expect("verdict"),
                Verdict::Open
            );
            assert_eq!(
                open(&bob, &alice, s).expect("opens"),
                chat(&format!("m{i}"))
            );
        }
        let opened = open_ready(&bob, &alice);
        let expected: Vec<_> = ((2 * WINDOW)..count)
            .map(|i| chat(&format!("m{i}")))
            .collect();
        assert_eq!(opened, expected, "every held message opens, in order");

        // A message that never comes: the ones after it wait for the patience, then open.
        let more: Vec<_> = (0..(2 * WINDOW))
            .map(|i| say(&alice, &bob, &format!("n{i}")))
            .collect();
        // n0 to n{WINDOW-1} never come; the rest are held.
        for s in &more[(WINDOW as usize)..] {
            hold(s);
        }
        assert!(open_ready(&bob, &alice).is_empty());
        let patience = PATIENCE.as_millis() as u64;
        assert!(bob
            .olm
            .give_up_waiting(1_000 + patience - 1, PATIENCE)
            .expect("sweep")
            .contains(&alice.peer));
        assert!(open_ready(&bob, &alice).is_empty(), "not yet overdue");
        bob.olm
            .give_up_waiting(1_000 + patience, PATIENCE)
            .expect("sweep");
        let opened = open_ready(&bob, &alice);
        let expected: Vec<_> = (WINDOW..(2 * WINDOW))
            .map(|i| chat(&format!("n{i}")))
            .collect();
        assert_eq!(opened, expected);
    }

    #[tokio::test]
    async fn a_tampered_ciphertext_or_forged_identity_is_refused() {
        let alice = side().await;
        let bob = side().await;
        connect(&alice, &bob);
        let mut first = say(&alice, &bob, "x");
        let last = first.ciphertext.len() - 1;
        first.ciphertext[last] ^= 1;
        assert!(open(&bob, &alice, &first).is_err());
        // An identity signed by someone else than the sender.
        let mallory = side().await;
        let mut forged = say(&alice, &bob, "y");
        forged.identity = Some(mallory.olm.identity().clone());
        assert!(matches!(
            open(&bob, &alice, &forged),
            Err(OpenError::Identity(_))
        ));
    }

    #[tokio::test]
    async fn the_fallback_key_lets_new_contacts_write_once_one_time_keys_ran_out() {
        let bob = side().await;
        // No one-time key left: only the (signed) fallback key is handed out, to everyone.
        let bundle = bob.olm.bundle(0).expect("bundle");
        assert!(bundle.one_time_keys.is_empty());
        let fallback = bundle.fallback.clone().expect("a fallback key");
        // Presented as a one-time key, its signature does not check out.
        let mallory = side().await;
        assert!(mallory
            .olm
            .start_session(&bob.peer, &bundle.identity, &fallback, false)
            .is_err());
        for name in ["alice", "carol"] {
            let writer = side().await;
            writer
                .olm
                .start_session(&bob.peer, &bundle.identity, &fallback, true)
                .expect("session on the fallback key");
            let hello = say(&writer, &bob, name);
            assert_eq!(open(&bob, &writer, &hello).expect("opens"), chat(name));
        }
    }

    #[tokio::test]
    async fn the_safety_number_is_the_same_on_both_sides_and_60_digits() {
        let alice = side().await;
        let bob = side().await;
        let ab = safety_number(alice.olm.identity(), bob.olm.identity());
        let ba = safety_number(bob.olm.identity(), alice.olm.identity());
        assert_eq!(ab, ba);
        assert_eq!(ab.split(' ').count(), 12);
        assert_eq!(ab.chars().filter(char::is_ascii_digit).count(), 60);
        let carol = side().await;
        assert_ne!(
            ab,
            safety_number(alice.olm.identity(), carol.olm.identity())
        );
    }
}
