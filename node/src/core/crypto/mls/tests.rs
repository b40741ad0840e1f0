//! Tests of the group crypto over real stores: membership changes, forward and post-compromise
//! secrecy, the past-epochs window, refusals, and durability.

use super::*;
use crate::core::store::{Batch, Store};
use kith_net::key_package::PackageError;
use libp2p::identity::Keypair;

struct Peer {
    member: Member,
    store: Store,
    key: Keypair,
    _dir: tempfile::TempDir,
}

impl Peer {
    fn new(config: Config) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let key = Keypair::generate_ed25519();
        let member = Member::new(store.clone(), &key, config).expect("member");
        Self {
            member,
            store,
            key,
            _dir: dir,
        }
    }

    fn id(&self) -> PeerId {
        self.member.peer()
    }

    /// One key package, its private keys written.
    fn package(&self) -> (PeerId, Vec<u8>) {
        let mut batch = Batch::new();
        let mut packages = self
            .member
            .key_packages(1, false, &mut batch)
            .expect("key package");
        self.store.apply(batch).expect("write");
        (self.id(), packages.remove(0))
    }
}

/// Writes a group's staged changes.
fn save(group: &Group) {
    let mut batch = Batch::new();
    group.stage(&mut batch);
    group.store().apply(batch).expect("write");
}

fn config() -> Config {
    Config::default()
}

fn group_id() -> GroupId {
    GroupId([7; 16])
}

/// Alice creates a group and adds the others in one commit; they join from the Welcome.
fn form(admin: &Peer, others: &[&Peer]) -> (Group, Vec<Group>) {
    let mut group = admin.member.create(&group_id()).expect("create");
    save(&group);
    let packages: Vec<_> = others.iter().map(|p| p.package()).collect();
    let commit = group.add(&packages).expect("add");
    group.merge_pending().expect("merge");
    save(&group);
    let welcome = commit.welcome.expect("a welcome");
    let joined = others
        .iter()
        .map(|p| {
            let g = p
                .member
                .join(&welcome, &group_id(), &admin.id())
                .expect("join");
            save(&g);
            g
        })
        .collect();
    (group, joined)
}

fn send(group: &mut Group, text: &str) -> Vec<u8> {
    let sealed = group.encrypt(text.as_bytes()).expect("encrypt");
    save(group);
    sealed
}

fn open(group: &mut Group, sealed: &[u8], from: &PeerId) -> Result<String, MlsError> {
    let opened = group.decrypt(sealed, from)?;
    save(group);
    Ok(String::from_utf8(opened).expect("utf-8"))
}

fn apply(group: &mut Group, commit: &Commit, from: &PeerId) -> Applied {
    let applied = group
        .process_commit(&commit.commit, from, true)
        .expect("commit applies");
    save(group);
    applied
}

#[test]
fn three_members_exchange_messages() {
    let (alice, bob, carol) = (
        Peer::new(config()),
        Peer::new(config()),
        Peer::new(config()),
    );
    let (mut a, mut joined) = form(&alice, &[&bob, &carol]);
    let mut c = joined.pop().expect("carol");
    let mut b = joined.pop().expect("bob");
    for g in [&a, &b, &c] {
        assert_eq!(g.epoch(), 1);
        assert_eq!(g.members(), vec![alice.id(), bob.id(), carol.id()]);
    }
    let hello = send(&mut a, "hello from alice");
    assert_eq!(
        open(&mut b, &hello, &alice.id()).expect("bob reads"),
        "hello from alice"
    );
    assert_eq!(
        open(&mut c, &hello, &alice.id()).expect("carol reads"),
        "hello from alice"
    );
    let reply = send(&mut b, "bob here");
    assert_eq!(
        open(&mut a, &reply, &bob.id()).expect("alice reads"),
        "bob here"
    );
    assert_eq!(
        open(&mut c, &reply, &bob.id()).expect("carol reads"),
        "bob here"
    );
    let last = send(&mut c, "and carol");
    assert_eq!(
        open(&mut a, &last, &carol.id()).expect("alice reads"),
        "and carol"
    );
    assert_eq!(
        open(&mut b, &last, &carol.id()).expect("bob reads"),
        "and carol"
    );
    // The ciphertext does not carry the text.
    assert!(!hello.windows(5).any(|w| w == b"hello"));
}

#[test]
fn a_removed_member_cannot_read_after_its_removal() {
    let (alice, bob, carol) = (
        Peer::new(config()),
        Peer::new(config()),
        Peer::new(config()),
    );
    let (mut a, mut joined) = form(&alice, &[&bob, &carol]);
    let mut c = joined.pop().expect("carol");
    let mut b = joined.pop().expect("bob");
    // Carol keeps a copy that never sees her removal.
    let mut c_unaware = carol
        .member
        .load(&group_id())
        .expect("load")
        .expect("stored");

    let removal = a.remove(&[carol.id()]).expect("remove");
    a.merge_pending().expect("merge");
    save(&a);
    let applied = apply(&mut b, &removal, &alice.id());
    assert_eq!(applied.removed, vec![carol.id()]);
    assert!(!applied.removed_self);
    let applied = apply(&mut c, &removal, &alice.id());
    assert!(applied.removed_self);
    assert!(!c.is_active());

    let secret = send(&mut a, "after carol left");
    assert_eq!(
        open(&mut b, &secret, &alice.id()).expect("bob reads"),
        "after carol left"
    );
    let refused = open(&mut c, &secret, &alice.id());
    assert!(
        matches!(
            refused,
            Err(MlsError::FutureEpoch { .. } | MlsError::Inactive)
        ),
        "{refused:?}"
    );
    let refused = open(&mut c_unaware, &secret, &alice.id());
    assert!(
        matches!(
            refused,
            Err(MlsError::FutureEpoch {
                message: 2,
                current: 1
            })
        ),
        "{refused:?}"
    );
    // Carol can no longer send either.
    assert!(matches!(c.encrypt(b"still here?"), Err(MlsError::Inactive)));
}

/// Copies every MLS key of `from`'s store into a fresh store: a snapshot of its state.
fn snapshot(from: &Peer) -> Peer {
    let copy = Peer::new(config());
    for (key, value) in from.store.scan_raw(storage::PREFIX).expect("scan") {
        copy.store.set_raw(&key, Some(value)).expect("copy");
    }
    let member = Member::new(copy.store.clone(), &from.key, config()).expect("member");
    Peer { member, ..copy }
}

#[test]
fn state_copied_before_a_self_update_cannot_read_after_it() {
    let (alice, bob, carol) = (
        Peer::new(config()),
        Peer::new(config()),
        Peer::new(config()),
    );
    let (mut a, mut joined) = form(&alice, &[&bob, &carol]);
    let mut c = joined.pop().expect("carol");
    let mut b = joined.pop().expect("bob");

    // An attacker copies Bob's state; it reads the group for now.
    let stolen = snapshot(&bob);
    let mut copy = stolen
        .member
        .load(&group_id())
        .expect("load")
        .expect("copied");
    let before = send(&mut a, "before the update");
    assert_eq!(
        open(&mut copy, &before, &alice.id()).expect("copy reads"),
        "before the update"
    );
    assert_eq!(
        open(&mut b, &before, &alice.id()).expect("bob reads"),
        "before the update"
    );

    // Bob refreshes his leaf; the relay orders the commit, everyone applies it.
    let update = b.self_update().expect("self-update");
    b.merge_pending().expect("merge");
    save(&b);
    apply(&mut a, &update, &bob.id());
    apply(&mut c, &update, &bob.id());
    assert_eq!((a.epoch(), b.epoch(), c.epoch()), (2, 2, 2));

    let after = send(&mut a, "after the update");
    assert_eq!(
        open(&mut b, &after, &alice.id()).expect("bob reads"),
        "after the update"
    );
    assert_eq!(
        open(&mut c, &after, &alice.id()).expect("carol reads"),
        "after the update"
    );
    // The copy sees the commit on the wire but cannot follow it, and cannot read what follows.
    assert!(copy
        .process_commit(&update.commit, &bob.id(), true)
        .is_err());
    assert!(open(&mut copy, &after, &alice.id()).is_err());
}

#[test]
fn the_second_commit_for_an_epoch_is_stale_and_its_author_catches_up() {
    let (alice, bob, carol) = (
        Peer::new(config()),
        Peer::new(config()),
        Peer::new(config()),
    );
    let (mut a, mut joined) = form(&alice, &[&bob, &carol]);
    let mut c = joined.pop().expect("carol");
    let mut b = joined.pop().expect("bob");

    let first = a.self_update().expect("alice commits");
    save(&a);
    let second = b.self_update().expect("bob commits");
    save(&b);
    assert_eq!((first.epoch, second.epoch), (1, 1));
    // The relay applies Alice's; Bob's gets Conflict.
    a.merge_pending().expect("merge");
    save(&a);
    apply(&mut c, &first, &alice.id());
    let refused = c.process_commit(&second.commit, &bob.id(), true);
    assert!(
        matches!(
            refused,
            Err(MlsError::StaleEpoch {
                message: 1,
                current: 2
            })
        ),
        "{refused:?}"
    );
    // Refused input left Carol where she was.
    assert_eq!(c.epoch(), 2);

    // Bob drops his commit, catches up, and retries.
    b.discard_pending().expect("discard");
    save(&b);
    assert!(!b.has_pending());
    apply(&mut b, &first, &alice.id());
    let retry = b.self_update().expect("bob retries");
    assert_eq!(retry.epoch, 2);
    b.merge_pending().expect("merge");
    save(&b);
    apply(&mut a, &retry, &bob.id());
    apply(&mut c, &retry, &bob.id());
    assert_eq!((a.epoch(), b.epoch(), c.epoch()), (3, 3, 3));
    let text = send(&mut b, "in sync");
    assert_eq!(
        open(&mut a, &text, &bob.id()).expect("alice reads"),
        "in sync"
    );
    assert_eq!(
        open(&mut c, &text, &bob.id()).expect("carol reads"),
        "in sync"
    );
}

#[test]
fn late_messages_open_within_the_window_of_past_epochs_only() {
    let window = Config {
        max_past_epochs: 2,
        ..Config::default()
    };
    let (alice, bob) = (Peer::new(window), Peer::new(window));
    let (mut a, mut joined) = form(&alice, &[&bob]);
    let mut b = joined.pop().expect("bob");
    let advance = |a: &mut Group, b: &mut Group| {
        let commit = a.self_update().expect("commit");
        a.merge_pending().expect("merge");
        save(a);
        apply(b, &commit, &alice.id());
    };
    // Epoch 1: a message that will arrive far too late.
    let too_old = send(&mut a, "epoch one");
    advance(&mut a, &mut b);
    advance(&mut a, &mut b);
    // Epoch 3: a message that arrives one epoch late.
    let late = send(&mut a, "epoch three");
    advance(&mut a, &mut b);
    assert_eq!(b.epoch(), 4);
    assert_eq!(
        open(&mut b, &late, &alice.id()).expect("n-1 opens"),
        "epoch three"
    );
    let refused = open(&mut b, &too_old, &alice.id());
    assert!(matches!(refused, Err(MlsError::EpochGone)), "{refused:?}");
}

#[test]
fn bad_input_is_refused_with_typed_errors() {
    let (alice, bob, carol) = (
        Peer::new(config()),
        Peer::new(config()),
        Peer::new(config()),
    );
    let (mut a, mut joined) = form(&alice, &[&bob, &carol]);
    let mut c = joined.pop().expect("carol");
    let mut b = joined.pop().expect("bob");

    // Malformed bytes.
    assert!(matches!(
        b.decrypt(b"not mls", &alice.id()),
        Err(MlsError::Malformed(_))
    ));
    assert!(matches!(
        b.process_commit(b"not mls", &alice.id(), true),
        Err(MlsError::Malformed(_))
    ));
    let mut flipped = send(&mut a, "flip me");
    let at = flipped.len() - 5;
    flipped[at] ^= 1;
    assert!(matches!(
        b.decrypt(&flipped, &alice.id()),
        Err(MlsError::Undecryptable(_))
    ));

    // A message whose envelope names another sender than its MLS credential.
    let text = send(&mut a, "from alice");
    let refused = b.decrypt(&text, &carol.id());
    assert!(
        matches!(
            refused,
            Err(MlsError::Credential(BindingError::WrongIdentity { .. }))
        ),
        "{refused:?}"
    );
    // The refusal cost nothing: the message still opens for its true sender.
    assert_eq!(
        open(&mut b, &text, &alice.id()).expect("opens"),
        "from alice"
    );
    // A second copy finds its key used.
    let again = b.decrypt(&text, &alice.id());
    assert!(matches!(again, Err(MlsError::KeyGone)), "{again:?}");

    // A non-member with a group of the same id, at the same epoch.
    let dave = Peer::new(config());
    let mut d = dave.member.create(&group_id()).expect("create");
    let commit = d.self_update().expect("commit");
    let _ = commit;
    d.merge_pending().expect("merge");
    assert_eq!(d.epoch(), b.epoch());
    let intruder = d.encrypt(b"let me in").expect("encrypt");
    let refused = b.decrypt(&intruder, &dave.id());
    assert!(
        matches!(
            refused,
            Err(MlsError::Undecryptable(_) | MlsError::NotMember)
        ),
        "{refused:?}"
    );

    // A commit changing membership from a member who may not.
    let removal = b.remove(&[carol.id()]).expect("bob's removal");
    let refused = c.process_commit(&removal.commit, &bob.id(), false);
    assert!(
        matches!(refused, Err(MlsError::NotAllowed(p)) if p == bob.id()),
        "{refused:?}"
    );
    assert_eq!(c.epoch(), 1);
    // A commit whose envelope names another peer than its author.
    let refused = c.process_commit(&removal.commit, &alice.id(), true);
    assert!(
        matches!(refused, Err(MlsError::Credential(_))),
        "{refused:?}"
    );
    assert!(c.is_active());
}

#[test]
fn key_packages_and_welcomes_must_be_bound_to_the_expected_peers() {
    let (alice, bob, mallory) = (
        Peer::new(config()),
        Peer::new(config()),
        Peer::new(config()),
    );
    let mut a = alice.member.create(&group_id()).expect("create");
    save(&a);
    // Mallory's package offered as Bob's.
    let (_, forged) = mallory.package();
    let refused = a.add(&[(bob.id(), forged)]);
    assert!(
        matches!(
            refused,
            Err(MlsError::Package { ref source, .. })
                if matches!(**source, PackageError::Binding(BindingError::WrongIdentity { .. }))
        ),
        "{refused:?}"
    );
    // A package naming Bob but signed with Mallory's key.
    let mut batch = Batch::new();
    let provider = storage::Provider::new(mallory.store.clone());
    let signer = Signer::new(&mallory.key).expect("signer");
    let mut credential = signer.credential();
    credential.credential = BasicCredential::new(bob.id().to_bytes()).into();
    let bundle = kith_net::key_package::builder(false)
        .build(CIPHERSUITE, &provider, &signer, credential)
        .expect("build");
    provider.overlay().stage(&mut batch);
    let bytes = bundle
        .key_package()
        .tls_serialize_detached()
        .expect("encode");
    let refused = a.add(&[(bob.id(), bytes)]);
    assert!(
        matches!(
            refused,
            Err(MlsError::Package { ref source, .. })
                if matches!(**source, PackageError::Binding(BindingError::WrongSignatureKey(_)))
        ),
        "{refused:?}"
    );
    assert_eq!(a.epoch(), 0);

    // A real add; the Welcome is refused for another group or another adder.
    let commit = a.add(&[bob.package()]).expect("add");
    a.merge_pending().expect("merge");
    save(&a);
    let welcome = commit.welcome.expect("welcome");
    assert!(matches!(
        bob.member.join(&welcome, &GroupId([8; 16]), &alice.id()),
        Err(MlsError::WelcomeWrongGroup)
    ));
    assert!(matches!(
        bob.member.join(&welcome, &group_id(), &mallory.id()),
        Err(MlsError::WelcomeWrongAdder(_))
    ));
    assert!(matches!(
        bob.member.join(b"junk", &group_id(), &alice.id()),
        Err(MlsError::Malformed(_))
    ));
    // The refusals consumed nothing: the right expectations still join.
    let b = bob
        .member
        .join(&welcome, &group_id(), &alice.id())
        .expect("join");
    assert_eq!(b.epoch(), 1);
}

#[test]
fn changes_not_staged_are_lost_and_the_stored_state_stays() {
    let (alice, bob) = (Peer::new(config()), Peer::new(config()));
    let (a, _) = form(&alice, &[&bob]);
    drop(a);
    {
        // A crash before the write: the commit and its merge were never staged.
        let mut a = alice
            .member
            .load(&group_id())
            .expect("load")
            .expect("stored");
        a.self_update().expect("commit");
        a.merge_pending().expect("merge");
        assert_eq!(a.epoch(), 2);
        let mut batch = Batch::new();
        a.stage(&mut batch);
        drop(batch);
    }
    let a = alice
        .member
        .load(&group_id())
        .expect("load")
        .expect("stored");
    assert_eq!(a.epoch(), 1);
    assert!(!a.has_pending());
    // Nothing unstaged reached the store either: the same holds with no batch at all.
    let mut a = a;
    a.self_update().expect("commit");
    drop(a);
    let a = alice
        .member
        .load(&group_id())
        .expect("load")
        .expect("stored");
    assert!(!a.has_pending());
}

#[tokio::test]
async fn state_survives_reopening_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (alice, bob) = (Peer::new(config()), Peer::new(config()));
    let key = Keypair::generate_ed25519();
    let carol_id = key.public().to_peer_id();
    let welcome = {
        let store = Store::open(dir.path()).expect("store");
        let carol = Member::new(store.clone(), &key, config()).expect("member");
        let mut batch = Batch::new();
        let package = carol
            .key_packages(1, false, &mut batch)
            .expect("package")
            .remove(0);
        store.commit(batch).await.expect("commit");
        let (mut a, _) = form(&alice, &[&bob]);
        let commit = a.add(&[(carol_id, package)]).expect("add");
        a.merge_pending().expect("merge");
        save(&a);
        let c = carol
            .join(
                commit.welcome.as_ref().expect("welcome"),
                &group_id(),
                &alice.id(),
            )
            .expect("join");
        let mut batch = Batch::new();
        c.stage(&mut batch);
        store.commit(batch).await.expect("commit");
        let closed = store.closed();
        drop((c, carol, store));
        closed.wait().await;
        a
    };
    let mut a = welcome;
    let store = Store::open(dir.path()).expect("reopen");
    let carol = Member::new(store.clone(), &key, config()).expect("member");
    let mut c = carol.load(&group_id()).expect("load").expect("stored");
    assert_eq!(c.epoch(), 2);
    let text = send(&mut a, "still there");
    assert_eq!(
        c.decrypt(&text, &alice.id()).expect("opens"),
        b"still there"
    );
}

#[test]
fn a_last_resort_package_lets_its_owner_join_again_and_again() {
    let (alice, bob) = (Peer::new(config()), Peer::new(config()));
    let mut batch = Batch::new();
    let package = bob
        .member
        .key_packages(1, true, &mut batch)
        .expect("last resort")
        .remove(0);
    bob.store.apply(batch).expect("write");
    kith_net::key_package::verify(&package, &bob.id(), Some(true)).expect("a last-resort package");
    for id in [GroupId([1; 16]), GroupId([2; 16])] {
        let mut a = alice.member.create(&id).expect("create");
        let commit = a.add(&[(bob.id(), package.clone())]).expect("add");
        a.merge_pending().expect("merge");
        save(&a);
        let mut b = bob
            .member
            .join(commit.welcome.as_ref().expect("welcome"), &id, &alice.id())
            .expect("joins with the same package");
        save(&b);
        let text = send(&mut a, "welcome");
        assert_eq!(open(&mut b, &text, &alice.id()).expect("reads"), "welcome");
    }
}
