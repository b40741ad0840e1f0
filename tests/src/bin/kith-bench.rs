//! `kith-bench`: runs the project's benchmarks, each next to a baseline measured in the same
//! run, and rewrites `BENCHMARKS.md`.
//!
//! Run it in release mode: `cargo run --release -p kith-tests --bin kith-bench` (add `--quick`
//! for a small version).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use kith_node::NodeEvent;
use kith_protocol::MessageState;
use kith_tests::bench::{bare_request_response, percentile, BareDm, Figures};
use kith_tests::{befriend, TestNode};

/// jemalloc instead of the system allocator: no per-allocation header and tight size classes,
/// which is what a relay holding thousands of idle connections spends its memory on, and less
/// time in malloc on the message path.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Runs every kith benchmark next to its baseline and writes BENCHMARKS.md.
#[derive(Parser)]
struct Args {
    /// Internal: run a server in this process for the parent benchmark (memory is read per
    /// process).
    #[command(subcommand)]
    serve: Option<Serve>,
    /// A small, fast version (under two minutes).
    #[arg(long)]
    quick: bool,
    /// Run only the file-transfer rows and replace them in an existing table.
    #[arg(long)]
    files_only: bool,
    /// Run only the direct-delivery rows and print them (the table is not written).
    #[arg(long)]
    direct_only: bool,
    /// Measure only send → delivered latency, kith next to bare request-response, with SAMPLES
    /// messages each (for profiling); prints p50 and p99.
    #[arg(long, value_name = "SAMPLES")]
    latency_only: Option<usize>,
    /// Measure only durably delivered messages a second, kith next to bare request-response,
    /// with COUNT messages each (for profiling); prints both and their ratio.
    #[arg(long, value_name = "COUNT")]
    throughput_only: Option<usize>,
    /// Run only the relay rows (deposits, fetch, offline→online, memory per idle node) and
    /// replace them in an existing table.
    #[arg(long)]
    relay_only: bool,
    /// Run only the attack benchmark: each attack against a real `kith-relay` process with
    /// honest traffic alongside; prints the table and rewrites the "Attacks" section of the
    /// output file.
    #[arg(long)]
    attack: bool,
    /// With `--attack`: print JSON instead of the table.
    #[arg(long, requires = "attack")]
    json: bool,
    /// With `--attack`: only these attacks (comma-separated names, e.g. `garbage,retry-storm`).
    #[arg(long, requires = "attack", value_delimiter = ',')]
    attack_only: Vec<String>,
    /// With `--attack`: the `kith-relay` binary (default: the one next to this binary).
    #[arg(long, requires = "attack")]
    relay_binary: Option<PathBuf>,
    /// With `--attack`: copy each relay's log into this directory (`<attack>.log`).
    #[arg(long, requires = "attack")]
    attack_logs: Option<PathBuf>,
    /// With `--attack`: run the honest pair on the attackers' core (at normal priority, above
    /// the attackers'), leaving the relay a core of its own, instead of beside the relay.
    #[arg(long, requires = "attack")]
    honest_beside_attackers: bool,
    /// Run only the attack benchmark against a node: each attack against a real `kith` daemon
    /// with a contact sending it direct messages alongside; prints the table and rewrites the
    /// "Attacks on a node" section of the output file.
    #[arg(long, conflicts_with = "attack")]
    attack_node: bool,
    /// With `--attack-node`: the `kith` binary (default: the one next to this binary).
    #[arg(long, requires = "attack_node")]
    kith_binary: Option<PathBuf>,
    /// Run only the group rows (a 200-member encrypted group: one message, create, add,
    /// remove) and print them (the table is not written).
    #[arg(long)]
    group_only: bool,
    /// Run only the MLS group crypto figures (no network) and print them.
    #[arg(long)]
    mls: bool,
    /// Where to write the table.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
}

#[derive(clap::Subcommand)]
enum Serve {
    /// Run a kith relay with benchmark limits in a temporary directory.
    #[command(hide = true)]
    ServeRelay,
    /// Run a bare libp2p circuit relay server.
    #[command(hide = true)]
    ServeBare,
}

struct Row {
    figure: String,
    value: String,
    baseline: String,
    ratio: String,
    target: String,
}

/// kith direct delivery between two nodes on loopback: send to `delivered` (the recipient
/// verified, stored and flushed).
struct KithDirect {
    alice: TestNode,
    bob: TestNode,
    events: tokio::sync::broadcast::Receiver<NodeEvent>,
    text: String,
    /// Messages sent so far (all must reach bob).
    sent: usize,
}

impl KithDirect {
    /// Starts both nodes, makes them contacts and warms up the connection.
    async fn start(payload: usize) -> Result<Self> {
        let alice = TestNode::start("alice", vec![]).await?;
        let bob = TestNode::start("bob", vec![]).await?;
        befriend(&alice, "bob", &bob).await?;
        befriend(&bob, "alice", &alice).await?;
        let events = alice.node().subscribe();
        let text = "x".repeat(payload);
        alice
            .node()
            .send("bob", &text, Some(Duration::from_secs(10)))
            .await?;
        Ok(Self {
            alice,
            bob,
            events,
            text,
            sent: 1,
        })
    }

    /// Times `n` messages one after another, each from `send` until it is `delivered`, adding
    /// each latency to `into`.
    async fn time(&mut self, n: usize, into: &mut Vec<Duration>) -> Result<()> {
        for _ in 0..n {
            let started = Instant::now();
            let sent = self.alice.node().send("bob", &self.text, None).await?;
            self.sent += 1;
            loop {
                match self.events.recv().await? {
                    NodeEvent::Receipt { id, state, .. }
                        if id == sent.id && state >= MessageState::Delivered =>
                    {
                        break
                    }
                    _ => {}
                }
            }
            into.push(started.elapsed());
        }
        Ok(())
    }

    /// Durably delivered messages per second for `count` messages, many in flight; then checks
    /// that bob holds every message sent.
    async fn per_sec(&mut self, count: usize) -> Result<f64> {
        let started = Instant::now();
        let sender = tokio::spawn(kith_tests::bench::send_many(
            self.alice.node().clone(),
            "bob",
            self.text.clone(),
            count,
        ));
        let mut delivered = 0;
        while delivered < count {
            match self.events.recv().await {
                Ok(NodeEvent::Receipt {
                    state: MessageState::Delivered,
                    ..
                }) => delivered += 1,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    anyhow::bail!("event stream lagged by {n}; raise the broadcast capacity")
                }
                Err(e) => return Err(e.into()),
            }
        }
        let elapsed = started.elapsed();
        sender.await??;
        self.sent += count;
        let inbox = self.bob.node().messages(Some("alice"))?.len();
        anyhow::ensure!(
            inbox == self.sent,
            "bob holds {inbox} messages, expected {}",
            self.sent
        );
        Ok(count as f64 / elapsed.as_secs_f64())
    }
}

/// The first message to a new contact (a key claimed from it, an Olm session set up, the
/// pre-key message sent and stored) next to the second one on the same session: send →
/// delivered for each, over `pairs` new contacts.
async fn first_contact(pairs: usize) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let alice = TestNode::start("alice", vec![]).await?;
    let mut events = alice.node().subscribe();
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for i in 0..pairs {
        let mut bob = TestNode::start("bob", vec![]).await?;
        let name = format!("bob{i}");
        befriend(&alice, &name, &bob).await?;
        befriend(&bob, "alice", &alice).await?;
        for into in [&mut first, &mut second] {
            let started = Instant::now();
            let sent = alice.node().send(&name, "hello", None).await?;
            loop {
                match events.recv().await? {
                    NodeEvent::Receipt { id, state, .. }
                        if id == sent.id && state >= MessageState::Delivered =>
                    {
                        break
                    }
                    _ => {}
                }
            }
            into.push(started.elapsed());
        }
        bob.stop().await;
    }
    first.sort();
    second.sort();
    Ok((first, second))
}

/// What end-to-end encryption may add to a message's send → delivered time (sealing, opening
/// and the session's write).
const OLM_ALLOWANCE: Duration = Duration::from_micros(40);

/// Rounds the send → delivered samples are taken in, kith and its baselines in turn, so that all
/// of them see the same moments of a noisy machine.
const LATENCY_ROUNDS: usize = 5;

/// Send → delivered latency: `samples` each from kith and every baseline, in
/// [`LATENCY_ROUNDS`] interleaved rounds. Returns kith's sorted samples, then each baseline's.
async fn interleaved_latency(
    samples: usize,
    kith: &mut KithDirect,
    baselines: &mut [&mut BareDm],
) -> Result<(Vec<Duration>, Vec<Vec<Duration>>)> {
    let mut ours = Vec::with_capacity(samples);
    let mut theirs = vec![Vec::with_capacity(samples); baselines.len()];
    for round in 0..LATENCY_ROUNDS {
        // The first rounds take one more each of what division left over.
        let n = samples / LATENCY_ROUNDS + usize::from(round < samples % LATENCY_ROUNDS);
        for (bare, into) in baselines.iter_mut().zip(theirs.iter_mut()) {
            bare.time(n, into).await?;
        }
        kith.time(n, &mut ours).await?;
    }
    ours.sort();
    for t in &mut theirs {
        t.sort();
    }
    Ok((ours, theirs))
}

/// Relay figures: deposits, fetches, offline→online latency, memory per idle node.
async fn relay_rows(quick: bool, rows: &mut Vec<Row>) -> Result<()> {
    use kith_tests::relay_bench::{
        deposits_per_sec, fetch_per_sec, offline_to_online, rss_per_idle_node, ChildServer,
    };
    let (senders, per_sender, fetch, samples, idle) = if quick {
        (8, 1_000, 2_000, 10, 300)
    } else {
        (16, 2_500, 10_000, 50, 1_000)
    };
    let payload = 200;
    eprintln!("[relay 1/4] bare request-response baseline ({payload} bytes)…");
    let bare = bare_request_response(payload, 50, senders * per_sender / 4, 256, false).await?;
    let relay = ChildServer::spawn(&["serve-relay"])?;
    eprintln!("[relay 2/4] {senders} senders × {per_sender} durable deposits of {payload} bytes…");
    let deposits = deposits_per_sec(&relay, senders, per_sender, 64, payload).await?;
    rows.push(Row {
        figure: format!(
            "relay: durable deposits/s ({senders} senders, {payload} B, 64 in flight each)"
        ),
        value: format!("{deposits:.0}/s"),
        baseline: format!("{:.0}/s", bare.per_sec),
        ratio: format!("{:.2}", deposits / bare.per_sec),
        target: "≥ 10,000/s".into(),
    });
    eprintln!("[relay 3/4] fetch of {fetch} messages, and offline→online delivery ×{samples}…");
    let fetched = fetch_per_sec(&relay, fetch, payload).await?;
    rows.push(Row {
        figure: format!("relay: mailbox fetch + ack ({fetch} messages, batches of 256)"),
        value: format!("{fetched:.0} msgs/s"),
        baseline: format!("{:.0}/s", bare.per_sec),
        ratio: format!("{:.2}", fetched / bare.per_sec),
        target: "—".into(),
    });
    let (p50, p99) = offline_to_online(&relay, samples).await?;
    rows.push(Row {
        figure: "relay: offline→online delivery (node start → message stored), p50 / p99".into(),
        value: format!("{} / {}", ms(p50), ms(p99)),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "—".into(),
    });
    drop(relay);
    eprintln!("[relay 4/4] RSS with {idle} idle nodes (connection + circuit reservation)…");
    let relay = ChildServer::spawn(&["serve-relay"])?;
    let kith_rss = rss_per_idle_node(&relay, idle).await?;
    drop(relay);
    let bare_server = ChildServer::spawn(&["serve-bare"])?;
    let bare_rss = rss_per_idle_node(&bare_server, idle).await?;
    drop(bare_server);
    rows.push(Row {
        figure: format!("relay: RSS per idle connected node ({idle} nodes with a reservation)"),
        value: format!("{kith_rss:.1} KiB"),
        baseline: format!("{bare_rss:.1} KiB (bare libp2p relay server)"),
        ratio: format!("{:.2}", kith_rss / bare_rss.max(0.1)),
        target: "≤ 50 KiB".into(),
    });
    Ok(())
}

/// Graceful degradation: the same overload on a relay with shedding on and (the baseline) off.
async fn overload_rows(quick: bool, rows: &mut Vec<Row>) -> Result<()> {
    use kith_tests::presence::{overload, Tally};
    let duration = Duration::from_secs(if quick { 3 } else { 10 });
    eprintln!("[overload 1/2] floods for {duration:?} on a relay with load shedding…");
    let on = overload(true, duration).await?;
    eprintln!("[overload 2/2] the same floods with load shedding off…");
    let off = overload(false, duration).await?;
    for (name, o) in [("shedding on", &on), ("shedding off", &off)] {
        eprintln!(
            "      {name}: messages {}/{} stored, receipts {}/{}, presence {}/{}",
            o.messages.ok,
            o.messages.total(),
            o.receipts.ok,
            o.receipts.total(),
            o.presence.ok,
            o.presence.total()
        );
    }
    let rate = |t: &Tally| format!("{:.1} % of {}", t.success_rate() * 100.0, t.total());
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}", a / b)
        } else {
            "—".into()
        }
    };
    let p99 = |t: &Tally| {
        let mut l = t.latencies.clone();
        l.sort();
        percentile(&l, 99.0)
    };
    rows.push(Row {
        figure: "overload: message deposits answered Stored (shedding on; baseline: off)".into(),
        value: rate(&on.messages),
        baseline: rate(&off.messages),
        ratio: ratio(on.messages.success_rate(), off.messages.success_rate()),
        target: "100 %".into(),
    });
    rows.push(Row {
        figure: "overload: message deposit p99 latency".into(),
        value: ms(p99(&on.messages)),
        baseline: ms(p99(&off.messages)),
        ratio: ratio(
            p99(&on.messages).as_secs_f64(),
            p99(&off.messages).as_secs_f64(),
        ),
        target: "< baseline".into(),
    });
    rows.push(Row {
        figure: "overload: message deposits stored per second".into(),
        value: format!("{:.0}/s", on.messages.ok as f64 / duration.as_secs_f64()),
        baseline: format!("{:.0}/s", off.messages.ok as f64 / duration.as_secs_f64()),
        ratio: ratio(on.messages.ok as f64, off.messages.ok as f64),
        target: "≥ baseline".into(),
    });
    rows.push(Row {
        figure: "overload: receipt deposits answered Stored (the rest: Busy, retried later)".into(),
        value: rate(&on.receipts),
        baseline: rate(&off.receipts),
        ratio: ratio(on.receipts.success_rate(), off.receipts.success_rate()),
        target: "—".into(),
    });
    rows.push(Row {
        figure: "overload: presence queries answered (the rest: Busy)".into(),
        value: rate(&on.presence),
        baseline: rate(&off.presence),
        ratio: ratio(on.presence.success_rate(), off.presence.success_rate()),
        target: "shed first".into(),
    });
    Ok(())
}

/// Groups: one message to a 200-member group, members in-process on loopback.
async fn group_rows(quick: bool, rows: &mut Vec<Row>) -> Result<()> {
    let (members, offline) = if quick { (200, 40) } else { (200, 50) };
    eprintln!("[group] one message to a {members}-member group ({offline} offline)…");
    let g = kith_tests::group_bench::one_message_to_a_group(members, offline).await?;
    eprintln!("      {g:?}");
    let online = g.online;
    rows.push(Row {
        figure: format!("group ({members} members): send → all {online} online members have it"),
        value: ms(g.online_all),
        baseline: format!("p50 {}", ms(g.online_p50)),
        ratio: "—".into(),
        target: "≤ 100 ms p50 (MLS)".into(),
    });
    rows.push(Row {
        figure: format!("group: send → sender sees all {online} online members delivered"),
        value: ms(g.online_receipts),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "≤ 2 s".into(),
    });
    rows.push(Row {
        figure: format!("group: {} offline members return → all have it", g.offline),
        value: ms(g.offline_after_return),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "—".into(),
    });
    rows.push(Row {
        figure: format!(
            "group: return → sender sees all {} members delivered",
            g.members - 1
        ),
        value: ms(g.all_receipts_after_return),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "≤ 2 s".into(),
    });
    rows.push(Row {
        figure: "group: relay CPU time during it (send → last receipt; baseline: wall time)".into(),
        value: ms(g.relay_cpu),
        baseline: ms(g.wall),
        ratio: format!(
            "{:.0} % of one core",
            100.0 * g.relay_cpu.as_secs_f64() / g.wall.as_secs_f64().max(1e-9)
        ),
        target: "—".into(),
    });
    for (what, call, all) in [
        (
            format!("create with {} members in one step", g.members - 1),
            g.create_call,
            g.create_all,
        ),
        (
            "remove one member of 200".to_owned(),
            g.remove_call,
            g.remove_all,
        ),
        ("add one member to 199".to_owned(), g.add_call, g.add_all),
    ] {
        rows.push(Row {
            figure: format!(
                "group (MLS): {what} → every member in the new epoch (baseline: the admin's call)"
            ),
            value: ms(all),
            baseline: ms(call),
            ratio: "—".into(),
            target: "—".into(),
        });
    }
    rows.push(Row {
        figure: format!(
            "group: process RSS with the relay and {} nodes (peak)",
            g.members
        ),
        value: format!("{} MiB", g.process_rss_kib / 1024),
        baseline: format!("peak {} MiB", g.process_hwm_kib / 1024),
        ratio: format!(
            "{:.1} MiB/node",
            g.process_rss_kib as f64 / 1024.0 / g.members as f64
        ),
        target: "—".into(),
    });
    Ok(())
}

/// Files: direct and through a relay, next to bare request-response moving the same bytes.
async fn media_rows(quick: bool, rows: &mut Vec<Row>) -> Result<()> {
    use kith_tests::media_bench::{bare_stream, direct, through_relay, Transfer};
    let mib = if quick { 20 } else { 100 };
    // Each figure is the median of `rounds` runs, the baseline's and kith's interleaved, so that
    // a burst of load from another tenant of the machine moves one run, not the figure.
    let rounds = if quick { 1 } else { 3 };
    let bytes = mib * 1024 * 1024;
    let (mut bare, mut direct_runs, mut ups, mut downs) = (vec![], vec![], vec![], vec![]);
    for round in 1..=rounds {
        eprintln!("[files {round}/{rounds}] bare libp2p: {mib} MiB as 256 KiB answers…");
        bare.push(bare_stream(bytes).await?);
        eprintln!("[files {round}/{rounds}] kith direct: {mib} MiB…");
        direct_runs.push(direct(bytes).await?);
        eprintln!("[files {round}/{rounds}] kith through a relay: {mib} MiB…");
        let (up, down) = through_relay(bytes).await?;
        ups.push(up);
        downs.push(down);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let throughputs = |runs: &[Transfer]| runs.iter().map(|t| t.bytes_per_sec).collect::<Vec<_>>();
    let mb = |b: f64| format!("{:.0} MB/s", b / 1e6);
    // "224 MB/s" for one run; "224 MB/s (211–236)" for the median of several and their range.
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        match v.len() {
            1 => mb(v[0]),
            _ => format!(
                "{} ({:.0}–{:.0})",
                mb(median(v.to_vec())),
                lo / 1e6,
                hi / 1e6
            ),
        }
    };
    let bare_median = median(bare.clone());
    let transfer_row = |figure: String, runs: &[Transfer]| Row {
        figure,
        value: spread(&throughputs(runs)),
        baseline: spread(&bare),
        ratio: format!("{:.2}", median(throughputs(runs)) / bare_median),
        target: "≥ 0.50".into(),
    };
    rows.push(transfer_row(
        format!("file direct: send-file → recipient has the checked file ({mib} MiB)"),
        &direct_runs,
    ));
    rows.push(transfer_row(
        format!("file via relay: upload, send-file → relay holds every chunk ({mib} MiB)"),
        &ups,
    ));
    rows.push(transfer_row(
        format!("file via relay: download from the relay, sender offline ({mib} MiB)"),
        &downs,
    ));
    // Memory: the largest growth of any run.
    let worst =
        |runs: &[Transfer], f: fn(&Transfer) -> u64| runs.iter().map(f).max().unwrap_or(0) / 1024;
    let relay_growth = |t: &&Transfer| t.relay_rss_peak_kib.saturating_sub(t.relay_rss_before_kib);
    let (Some(up), Some(down)) = (
        ups.iter().max_by_key(relay_growth),
        downs.iter().max_by_key(relay_growth),
    ) else {
        anyhow::bail!("no file transfer ran");
    };
    rows.push(Row {
        figure: format!(
            "file via relay: relay RSS during upload / download ({mib} MiB file; the run that grew most)"
        ),
        value: format!(
            "{} → {} MiB / {} → {} MiB",
            up.relay_rss_before_kib / 1024,
            up.relay_rss_peak_kib / 1024,
            down.relay_rss_before_kib / 1024,
            down.relay_rss_peak_kib / 1024
        ),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "flat (≪ file size)".into(),
    });
    rows.push(Row {
        figure: format!("file: sender+recipient process RSS growth, direct / upload / download ({mib} MiB file; largest of the runs)"),
        value: format!(
            "{} / {} / {} MiB",
            worst(&direct_runs, |t| t.local_rss_growth_kib),
            worst(&ups, |t| t.local_rss_growth_kib),
            worst(&downs, |t| t.local_rss_growth_kib),
        ),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "flat (≪ file size)".into(),
    });
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    format!("{cores} cores, {cpu}")
}

/// The heading of the section `--mls` writes.
const MLS_HEADING: &str = "## MLS crypto";

/// `--mls`: times the group crypto alone, prints the rows, and rewrites the "MLS crypto"
/// section of the output file.
async fn mls(args: &Args) -> Result<()> {
    let quick = args.quick;
    let rows = tokio::task::spawn_blocking(move || kith_tests::mls_bench::run(quick)).await??;
    let mut section = format!("{MLS_HEADING}\n\n");
    writeln!(section, "Produced by `cargo build --release -p kith-tests && target/release/kith-bench --mls{}` on {}: the group crypto of `kith_node::core::crypto::mls` alone, in one process with no network (what the groups do on each step, without the network). Each state change is staged into a store batch and applied, as a node would, without the flush it would share with its message or operation. Messages: {} in a row, one sender, one reader.\n", if quick { " --quick" } else { "" }, machine(), if quick { 200 } else { 2_000 })?;
    writeln!(section, "| figure | value |\n|---|---|")?;
    for row in &rows {
        writeln!(section, "| {} | {} |", row.what, row.value)?;
    }
    let old = std::fs::read_to_string(&args.out).unwrap_or_default();
    std::fs::write(&args.out, replace_section(&old, MLS_HEADING, &section))?;
    print!("{section}");
    Ok(())
}

/// The binary `given`, or else `name` next to this one; an error that says how to get it if it
/// is not there (`flag` passes another).
fn binary(given: Option<&PathBuf>, name: &str, flag: &str) -> Result<PathBuf> {
    let path = match given {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory")?
            .join(name),
    };
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it first (`cargo build --release --bin {name}`) or pass {flag}",
        path.display()
    );
    Ok(path)
}

/// `--attack`: runs the attack benchmark, prints it, and rewrites the "Attacks" section of
/// `args.out`.
async fn attack(args: &Args) -> Result<()> {
    use kith_tests::attack::{self, Attack, Settings};
    let relay_binary = binary(args.relay_binary.as_ref(), "kith-relay", "--relay-binary")?;
    let attacks = match args.attack_only.as_slice() {
        [] => Attack::ALL.to_vec(),
        names => names
            .iter()
            .map(|n| Attack::from_name(n).with_context(|| format!("no attack named {n}")))
            .collect::<Result<_>>()?,
    };
    let settings = Settings {
        log_dir: args.attack_logs.clone(),
        honest_beside_attackers: args.honest_beside_attackers,
        ..Settings::full(relay_binary)
    };
    let started = Instant::now();
    let report = attack::run(&settings, &attacks).await?;
    eprintln!("[attack] done in {:.0} s", started.elapsed().as_secs_f64());
    let mut section = String::new();
    writeln!(section, "## Attacks\n")?;
    writeln!(
        section,
        "Produced by `cargo build --release -p kith-relay -p kith-tests && target/release/kith-bench --attack` on {}, in {:.0} s. Each attack runs for {:.0} s against its own fresh `kith-relay` process (release build, its own data directory, log written into it), from loopback, while an honest sender deposits {} messages a second of 200 bytes for an honest recipient that fetches and acks every 100 ms (and takes the relay's pushes); the sender obeys `retry_after_ms`. The baseline is the same honest traffic on an unattacked relay in the same run. The attackers run on two threads of their own, pinned to the last CPU and at the lowest priority (`nice` 19), {placement}, in the baseline too: attackers elsewhere would not take the relay's CPU, and spinning threads on the relay's own core alone triple the honest p99 here. The control row is the unattacked relay while the attackers' threads only spin, which shows what sharing the machine costs the honest pair by itself (each attack's p99 is also given against it). ✅/❌: the target met or not.\n",
        machine(),
        started.elapsed().as_secs_f64(),
        report.attack_secs,
        report.honest_rate,
        placement = if settings.honest_beside_attackers {
            "the relay alone on the other CPUs, and the honest pair on the attackers' CPU at normal priority (`--honest-beside-attackers`: honest clients elsewhere would not wait for the relay's CPU either)"
        } else {
            "and the relay and the honest pair on the other CPUs"
        },
    )?;
    writeln!(section, "{}", report.markdown())?;
    writeln!(section, "Figures: relay RSS growth is the peak of `VmRSS` (sampled every 100 ms) during the attack minus its value before; honest p99 is the deposit latency (first try → `Stored`, retries included) of the honest messages first tried during the attack, those still waiting at its end counted with their age; lost are honest messages the relay stored that never reached the recipient, not stored are those the relay had still not stored when the phase ended (after the recovery wait of up to {} s, and up to 10 s more with no new messages); disk is the data directory's allocated blocks, log included, after the attack; CPU is the relay's utime + stime during the attack, divided by the requests and connections it refused (`kith_relay_rejects_total` plus connection-limit hits); recover is the time from the attack's end to the first 0.5 s window of honest deposits whose p99 is within 1.2× the baseline's.\n", settings.recover_within.as_secs())?;
    writeln!(section, "The attacks:\n")?;
    for a in &attacks {
        writeln!(
            section,
            "- **{}**: {}.",
            a.name(),
            a.describe(settings.scale)
        )?;
    }
    writeln!(
        section,
        "\nThe relay's config (every other field at its default):\n\n```toml\n{}\n```",
        report.relay_config
    )?;
    let old = std::fs::read_to_string(&args.out).unwrap_or_default();
    std::fs::write(&args.out, replace_section(&old, "## Attacks", &section))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{section}");
    }
    Ok(())
}

/// The heading of the section `--attack-node` writes.
const NODE_ATTACKS_HEADING: &str = "## Attacks on a node";

/// `--attack-node`: runs the attack benchmark against a node, prints it, and rewrites the
/// "Attacks on a node" section of `args.out`.
async fn attack_node(args: &Args) -> Result<()> {
    use kith_tests::attack::node::{self, NodeAttack};
    use kith_tests::attack::Settings;
    let kith = binary(args.kith_binary.as_ref(), "kith", "--kith-binary")?;
    let settings = Settings::full(PathBuf::new());
    let started = Instant::now();
    let rows = node::run(&kith, &settings, &NodeAttack::ALL).await?;
    eprintln!(
        "[attack-node] done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let mut section = String::new();
    writeln!(section, "{NODE_ATTACKS_HEADING}\n")?;
    writeln!(
        section,
        "Produced by `cargo build --release -p kith-node -p kith-tests && target/release/kith-bench --attack-node` on {}, in {:.0} s. Each attack runs for {:.0} s against its own fresh `kith` daemon (release build, its own home, default settings: `reach = everyone`), from loopback, while a contact sends it a 200-byte chat every {:.0} ms over `/kith/dm/1`, one at a time and never again (an attempt the node refuses or drops counts as not accepted); a message's latency runs from when it was due to `Accepted` (the node stored it), so a stall counts for every message it held up. The baseline is the same honest traffic on an unattacked node in the same run. The attackers run on two threads pinned to the last CPU at `nice` 19, the node and the honest sender on the other CPUs. Disk growth is the node's home (store, log) after the phase minus before; the node keeps at most 500 strangers' requests of at most 256 KiB each, so the 128 MiB target is that bound. ✅/❌: the target met or not.\n",
        machine(),
        started.elapsed().as_secs_f64(),
        settings.attack.as_secs_f64(),
        1000.0 / f64::from(settings.honest_rate),
    )?;
    writeln!(section, "{}", node::markdown(&rows))?;
    writeln!(section, "The attacks:\n")?;
    for a in NodeAttack::ALL {
        writeln!(
            section,
            "- **{}**: {}.",
            a.name(),
            a.describe(settings.scale)
        )?;
    }
    let old = std::fs::read_to_string(&args.out).unwrap_or_default();
    std::fs::write(
        &args.out,
        replace_section(&old, NODE_ATTACKS_HEADING, &section),
    )?;
    print!("{section}");
    Ok(())
}

/// The section of `text` starting at the line `heading`, up to the next `## ` heading.
fn section_of(text: &str, heading: &str) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.trim_end() == heading)?;
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## "))
        .map_or(lines.len(), |i| start + 1 + i);
    Some(lines[start..end].join("\n") + "\n")
}

/// `text` with its section starting at the line `heading` (up to the next `## ` heading)
/// replaced by `section`, or `section` appended.
fn replace_section(text: &str, heading: &str, section: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(start) = lines.iter().position(|l| l.trim_end() == heading) else {
        let sep = if text.is_empty() || text.ends_with("\n\n") {
            ""
        } else if text.ends_with('\n') {
            "\n"
        } else {
            "\n\n"
        };
        return format!("{text}{sep}{section}");
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## "))
        .map_or(lines.len(), |i| start + 1 + i);
    let mut out = lines[..start].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(section);
    if end < lines.len() {
        out.push('\n');
        out.push_str(&lines[end..].join("\n"));
        out.push('\n');
    }
    out
}

#[tokio::main]
async fn main() -> Result<()> {
    kith_tests::init_logs_to_stderr();
    let args = Args::parse();
    match args.serve {
        Some(Serve::ServeRelay) => {
            let dir = tempfile::tempdir()?;
            kith_tests::relay_bench::exit_when_parent_goes(Some(dir.path().to_owned()));
            return kith_tests::relay_bench::serve_relay(dir.path()).await;
        }
        Some(Serve::ServeBare) => {
            kith_tests::relay_bench::exit_when_parent_goes(None);
            return kith_tests::relay_bench::serve_bare().await;
        }
        None => {}
    }
    if args.attack {
        return attack(&args).await;
    }
    if args.attack_node {
        return attack_node(&args).await;
    }
    if args.mls {
        return mls(&args).await;
    }
    if args.group_only {
        let mut rows = Vec::new();
        group_rows(args.quick, &mut rows).await?;
        for r in &rows {
            println!(
                "| {} | {} | {} | {} | {} |",
                r.figure, r.value, r.baseline, r.ratio, r.target
            );
        }
        return Ok(());
    }
    if args.files_only || args.relay_only {
        let mut rows = Vec::new();
        let prefix = if args.relay_only {
            relay_rows(args.quick, &mut rows).await?;
            "| relay:"
        } else {
            media_rows(args.quick, &mut rows).await?;
            "| file"
        };
        let old = std::fs::read_to_string(&args.out).unwrap_or_default();
        // The new rows go where the old ones were (or after the table).
        let first = old.lines().position(|l| l.starts_with(prefix));
        let mut lines: Vec<String> = old
            .lines()
            .filter(|l| !l.starts_with(prefix))
            .map(str::to_owned)
            .collect();
        let at = first.unwrap_or_else(|| {
            lines
                .iter()
                .rposition(|l| l.starts_with('|'))
                .map_or(lines.len(), |i| i + 1)
        });
        for (k, r) in rows.iter().enumerate() {
            lines.insert(
                at + k,
                format!(
                    "| {} | {} | {} | {} | {} |",
                    r.figure, r.value, r.baseline, r.ratio, r.target
                ),
            );
        }
        std::fs::write(&args.out, lines.join("\n") + "\n")?;
        for r in &rows {
            eprintln!("{}: {} (baseline {})", r.figure, r.value, r.baseline);
        }
        return Ok(());
    }
    let (samples, count) = if args.quick {
        (200, 2_000)
    } else {
        (1_000, 10_000)
    };
    let payload = 100;
    let mut rows = Vec::new();
    if let Some(samples) = args.latency_only {
        let mut bare = BareDm::start(payload, true).await?;
        let mut kith = KithDirect::start(payload).await?;
        let (kith, bare) = interleaved_latency(samples, &mut kith, &mut [&mut bare]).await?;
        println!(
            "send → delivered p50 / p99: kith {} / {}, bare {} / {}",
            ms(percentile(&kith, 50.0)),
            ms(percentile(&kith, 99.0)),
            ms(percentile(&bare[0], 50.0)),
            ms(percentile(&bare[0], 99.0))
        );
        return Ok(());
    }
    if let Some(count) = args.throughput_only {
        let mut bare = BareDm::start(payload, true).await?;
        let bare_per_sec = bare.per_sec(count, 256).await?;
        drop(bare);
        let mut kith = KithDirect::start(payload).await?;
        let kith_per_sec = kith.per_sec(count).await?;
        println!(
            "durably delivered msgs/s: kith {kith_per_sec:.0}/s, bare {bare_per_sec:.0}/s, {:.2}",
            kith_per_sec / bare_per_sec
        );
        return Ok(());
    }

    // Latency first, on a quiet machine: the store and one-sided benchmarks below leave the
    // kernel writing back and freeing their databases for a while, which slows kith's flushes
    // (and not the bare baseline, which writes nothing).
    eprintln!(
        "[1/3] send → delivered latency: {samples} messages of {payload} bytes, kith and bare \
         request-response in turn…"
    );
    let mut bare = BareDm::start(payload, false).await?;
    let mut bare_0rtt = BareDm::start(payload, true).await?;
    let mut direct = KithDirect::start(payload).await.context("kith direct")?;
    let (kith_samples, bare_samples) =
        interleaved_latency(samples, &mut direct, &mut [&mut bare, &mut bare_0rtt])
            .await
            .context("kith direct")?;
    eprintln!("[2/3] store: one durable commit, and {count} commits from 512 tasks…");
    let store = kith_tests::bench::store_commits(samples.min(200), count, 512).await?;
    let flush = &store.back_to_back;
    eprintln!(
        "      flush p50 {} p99 {} (lone: p50 {} p99 {}), {:.0} commits/s",
        ms(flush.p50),
        ms(flush.p99),
        ms(store.lone_p50),
        ms(store.lone_p99),
        flush.per_sec
    );
    let inbound = kith_tests::bench::kith_inbound_only(payload, count, 256).await?;
    eprintln!("      kith inbound only: {inbound:.0}/s");
    eprintln!("[3/3] throughput: {count} messages of {payload} bytes, many in flight…");
    let figures = |samples: &[Duration], per_sec: f64| Figures {
        p50: percentile(samples, 50.0),
        p99: percentile(samples, 99.0),
        per_sec,
    };
    let bare_per_sec = bare.per_sec(count, 256).await?;
    drop((bare, bare_0rtt));
    let kith_per_sec = direct.per_sec(count).await.context("kith direct")?;
    let bare = figures(&bare_samples[0], bare_per_sec);
    // The 0-RTT baseline's latency only: its throughput is the same request-response.
    let bare_0rtt_p50 = percentile(&bare_samples[1], 50.0);
    let kith = figures(&kith_samples, kith_per_sec);

    // p50 against a bare baseline; the target is 2× that baseline plus one flush.
    let p50_row = |figure: &str, bare_p50: Duration, target: &str| Row {
        figure: figure.into(),
        value: ms(kith.p50),
        baseline: ms(bare_p50),
        ratio: format!("{:.1}×", kith.p50.as_secs_f64() / bare_p50.as_secs_f64()),
        target: target
            .replace("{}", &ms(bare_p50 * 2 + flush.p50 + OLM_ALLOWANCE))
            .replace("{lone}", &ms(bare_p50 * 2 + store.lone_p50 + OLM_ALLOWANCE)),
    };
    rows.push(p50_row(
        "direct: send → delivered, p50",
        bare.p50,
        "≤ 2× baseline + one flush + 40 µs (encryption) = {} (with a lone flush: {lone})",
    ));
    rows.push(p50_row(
        "direct: send → delivered, p50, against bare request-response negotiating in 0-RTT as kith does",
        bare_0rtt_p50,
        "— (2× baseline + one flush + 40 µs = {}; with a lone flush: {lone})",
    ));
    rows.push(Row {
        figure: format!(
            "store: one durable commit (sled flush), p50 / p99: back to back; lone (after {} µs idle); group commit from 512 tasks",
            kith_tests::bench::LONE_COMMIT_GAP.as_micros()
        ),
        value: format!(
            "{} / {}; {} / {}; {:.0} commits/s",
            ms(flush.p50),
            ms(flush.p99),
            ms(store.lone_p50),
            ms(store.lone_p99),
            flush.per_sec
        ),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "—".into(),
    });
    rows.push(Row {
        figure: "direct: send → delivered, p99".into(),
        value: ms(kith.p99),
        baseline: ms(bare.p99),
        ratio: format!("{:.1}×", kith.p99.as_secs_f64() / bare.p99.as_secs_f64()),
        target: "—".into(),
    });
    rows.push(Row {
        figure: format!("direct: durably delivered msgs/s ({count} × {payload} B, 512 in flight)"),
        value: format!("{:.0}/s", kith.per_sec),
        baseline: format!("{:.0}/s", bare.per_sec),
        ratio: format!("{:.2}", kith.per_sec / bare.per_sec),
        target: "≥ 5,000/s and ≥ 0.45× baseline".into(),
    });
    rows.push(Row {
        figure: "direct, receiving side alone (bare sender of pre-signed envelopes in the clear, so without decryption; 256 in flight)"
            .into(),
        value: format!("{inbound:.0}/s"),
        baseline: format!("{:.0}/s", bare.per_sec),
        ratio: format!("{:.2}", inbound / bare.per_sec),
        target: "—".into(),
    });
    // No "sending side alone" row: with end-to-end encryption a sender needs its recipient's
    // keys, which a bare recipient that answers at once does not have.

    let pairs = if args.quick { 10 } else { 40 };
    eprintln!("      first message to each of {pairs} new contacts…");
    let (first, second) = first_contact(pairs).await.context("first contact")?;
    rows.push(Row {
        figure: format!(
            "direct: first message to a new contact (key claim, Olm session, delivered), p50 of {pairs}; baseline: the second message"
        ),
        value: ms(percentile(&first, 50.0)),
        baseline: ms(percentile(&second, 50.0)),
        ratio: format!(
            "{:.1}×",
            percentile(&first, 50.0).as_secs_f64() / percentile(&second, 50.0).as_secs_f64()
        ),
        target: "—".into(),
    });

    if args.direct_only {
        for r in &rows {
            println!(
                "| {} | {} | {} | {} |",
                r.figure, r.value, r.baseline, r.ratio
            );
        }
        return Ok(());
    }
    relay_rows(args.quick, &mut rows)
        .await
        .context("relay benchmarks")?;
    overload_rows(args.quick, &mut rows)
        .await
        .context("overload benchmarks")?;
    group_rows(args.quick, &mut rows)
        .await
        .context("group benchmark")?;
    media_rows(args.quick, &mut rows)
        .await
        .context("file benchmark")?;

    let mut md = String::new();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "Produced by `cargo run --release -p kith-tests --bin kith-bench{}` on {}. Every figure is measured next to its baseline in the same run; the machine is shared and noisy, so compare ratios rather than absolute numbers.\n",
        if args.quick { " -- --quick" } else { "" },
        machine()
    )?;
    writeln!(md, "The baseline for direct delivery is bare libp2p request-response over the same transport (TCP, noise, yamux) and codec, with a server that answers at once: no signature check, no store, no flush. kith's figure includes signing, verification, the recipient's durable (flushed) write, the sender's outbox and its state update. The latency samples are taken in {LATENCY_ROUNDS} rounds, kith and both baselines in turn, so that all of them see the same moments of the machine, and before any other benchmark: the store and throughput runs leave the kernel writing back and freeing their databases for a while, which would slow kith's flushes and not the baseline.\n")?;
    writeln!(md, "kith-bench allocates with jemalloc like the `kith` and `kith-relay` binaries, and every baseline runs in the same binary (servers in child processes of it), so both sides of each row use the same allocator. The absolute targets (deposits per second, RSS per idle node) are what a relay operator gets from `kith-relay`.\n")?;
    writeln!(md, "The overload rows run one relay whose mailbox queue holds 64 requests (shedding from 32 in flight) under three floods at once, each from its own peer: message deposits (32 in flight), receipt deposits (128 in flight) and presence queries (64 in flight); the baseline is the same load on the same relay with load shedding off.\n")?;
    writeln!(md, "The file rows run three rounds (the bare transfer, kith direct, kith through a relay, in turn) and show the median with the range in brackets; the ratio is of the medians. Memory rows show the run that grew most.\n")?;
    writeln!(md, "| figure | kith | baseline | ratio | target |")?;
    writeln!(md, "|---|---|---|---|---|")?;
    for r in &rows {
        writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            r.figure, r.value, r.baseline, r.ratio, r.target
        )?;
    }
    // The attack rows come from `--attack` and `--attack-node`, the MLS ones from `--mls`:
    // keep them.
    let old = std::fs::read_to_string(&args.out).unwrap_or_default();
    let mut written = md.clone();
    for heading in ["## Attacks", NODE_ATTACKS_HEADING, MLS_HEADING] {
        if let Some(section) = section_of(&old, heading) {
            written = replace_section(&written, heading, &section);
        }
    }
    std::fs::write(&args.out, written)?;
    print!("{md}");
    Ok(())
}
