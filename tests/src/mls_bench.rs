//! `kith-bench --mls`: the cost of the group crypto alone (`kith_node::core::crypto::mls`), no
//! network: creating a group of 200 in one commit, adding one member to 199 (making 200) and
//! removing one of 200 (the admin's commit, one member processing it, the newcomer's join),
//! commit and Welcome sizes, and encrypt + decrypt per message. Each state change is staged
//! into a store batch and applied, as a node would (without the flush, which the node shares
//! with the message or operation the change belongs to).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kith_node::core::crypto::mls::{Config, Group, Member};
use kith_node::core::store::{Batch, Store};
use kith_protocol::{GroupId, PeerId};
use libp2p::identity::Keypair;

/// One figure.
pub struct Row {
    /// What was measured.
    pub what: String,
    /// The figure, with its unit.
    pub value: String,
}

fn row(rows: &mut Vec<Row>, what: &str, value: String) {
    eprintln!("[mls] {what}: {value}");
    rows.push(Row {
        what: what.into(),
        value,
    });
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn kib(bytes: usize) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

/// One member with its own store.
struct Side {
    member: Member,
    store: Store,
    peer: PeerId,
    _dir: tempfile::TempDir,
}

impl Side {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let member = Member::new(store.clone(), &key, Config::default())?;
        Ok(Self {
            member,
            store,
            peer,
            _dir: dir,
        })
    }

    fn package(&self) -> Result<(PeerId, Vec<u8>)> {
        let mut batch = Batch::new();
        let package = self
            .member
            .key_packages(1, false, &mut batch)?
            .pop()
            .context("no package")?;
        self.store.apply(batch)?;
        Ok((self.peer, package))
    }
}

fn save(group: &Group) -> Result<()> {
    let mut batch = Batch::new();
    group.stage(&mut batch);
    group.store().apply(batch)?;
    Ok(())
}

/// Runs the MLS rows.
pub fn run(quick: bool) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let id = GroupId::random();
    let admin = Side::new()?;
    let bob = Side::new()?;
    // The 197 others share one store: only their key packages are needed.
    let others_dir = tempfile::tempdir()?;
    let others_store = Store::open(others_dir.path())?;
    let mut packages = vec![bob.package()?];
    let mut batch = Batch::new();
    for _ in 0..197 {
        let key = Keypair::generate_ed25519();
        let member = Member::new(others_store.clone(), &key, Config::default())?;
        let package = member
            .key_packages(1, false, &mut batch)?
            .pop()
            .context("no package")?;
        packages.push((key.public().to_peer_id(), package));
    }
    others_store.apply(batch)?;

    // A group of 199 (the admin and 198) in one commit.
    let started = Instant::now();
    let mut group = admin.member.create(&id)?;
    let commit = group.add(&packages)?;
    group.merge_pending()?;
    save(&group)?;
    let created = started.elapsed();
    let welcome = commit.welcome.context("no welcome")?;
    row(
        &mut rows,
        "create a group of 199 in one commit (admin)",
        ms(created),
    );
    row(&mut rows, "its commit", kib(commit.commit.len()));
    row(
        &mut rows,
        "its Welcome (ratchet tree inside)",
        kib(welcome.len()),
    );
    let started = Instant::now();
    let mut b = bob.member.join(&welcome, &id, &admin.peer)?;
    save(&b)?;
    row(
        &mut rows,
        "join a group of 199 from the Welcome (one member)",
        ms(started.elapsed()),
    );

    // Add one: 200 members.
    let newcomer = Side::new()?;
    let started = Instant::now();
    let add = group.add(&[newcomer.package()?])?;
    group.merge_pending()?;
    save(&group)?;
    row(
        &mut rows,
        "add 1 to 199 → 200: the admin's commit",
        ms(started.elapsed()),
    );
    row(&mut rows, "its commit", kib(add.commit.len()));
    let add_welcome = add.welcome.context("no welcome")?;
    row(&mut rows, "its Welcome", kib(add_welcome.len()));
    let started = Instant::now();
    b.process_commit(&add.commit, &admin.peer, true)?;
    save(&b)?;
    row(
        &mut rows,
        "add 1: a member processes the commit",
        ms(started.elapsed()),
    );
    let started = Instant::now();
    let n = newcomer.member.join(&add_welcome, &id, &admin.peer)?;
    save(&n)?;
    row(
        &mut rows,
        "add 1: the newcomer joins from the Welcome",
        ms(started.elapsed()),
    );
    anyhow::ensure!(group.members().len() == 200, "not 200 members");

    // Remove one of 200.
    let gone = packages.last().map(|(p, _)| *p).context("no member")?;
    let started = Instant::now();
    let remove = group.remove(&[gone])?;
    group.merge_pending()?;
    save(&group)?;
    row(
        &mut rows,
        "remove 1 of 200: the admin's commit",
        ms(started.elapsed()),
    );
    row(&mut rows, "its commit", kib(remove.commit.len()));
    let started = Instant::now();
    b.process_commit(&remove.commit, &admin.peer, true)?;
    save(&b)?;
    row(
        &mut rows,
        "remove 1: a member processes the commit",
        ms(started.elapsed()),
    );

    // Application messages of 200 bytes in a group of 199.
    let count = if quick { 200 } else { 2_000 };
    let text = vec![b'x'; 200];
    let mut sealed = Vec::with_capacity(count);
    let started = Instant::now();
    for _ in 0..count {
        sealed.push(group.encrypt(&text)?);
        save(&group)?;
    }
    let encrypt = started.elapsed() / count as u32;
    let started = Instant::now();
    for message in &sealed {
        let opened = b.decrypt(message, &admin.peer)?;
        anyhow::ensure!(opened == text, "a message did not round-trip");
        save(&b)?;
    }
    let decrypt = started.elapsed() / count as u32;
    row(
        &mut rows,
        "encrypt a 200-byte message (group of 199, state staged)",
        format!("{:.0} µs", encrypt.as_secs_f64() * 1e6),
    );
    row(
        &mut rows,
        "decrypt it (state staged)",
        format!("{:.0} µs", decrypt.as_secs_f64() * 1e6),
    );
    row(
        &mut rows,
        "its ciphertext",
        format!("{} bytes", sealed.first().map(Vec::len).unwrap_or(0)),
    );
    Ok(rows)
}
