//! `kith-bench --attack`: each attack against a real `kith-relay` process on loopback, with an
//! honest sender and recipient using the relay alongside, next to the same honest traffic on
//! an unattacked relay measured in the same run.
//!
//! Each attack gets a fresh relay (so that one attack's leftovers do not count against the
//! next), and runs in phases: the honest pair starts and warms up; the attack runs for a fixed
//! time while the relay's memory is sampled; the attack stops and the honest deposit latency is
//! watched until it is back near the baseline (the time to recover); the sender stops and every
//! message the relay stored must reach the recipient. The figures per attack are in [`Row`].

pub mod attacks;
pub mod honest;
pub mod node;
pub mod relay;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustix::thread::CpuSet;
use serde::Serialize;
use tokio::task::JoinSet;

pub use attacks::Attack;
use attacks::{Counters, Target};
use honest::Honest;
pub use relay::Limits;
use relay::Relay;

use crate::bench::percentile;

/// How a run is shaped.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `kith-relay` binary to attack.
    pub relay_binary: PathBuf,
    /// The relay's limits.
    pub limits: Limits,
    /// Honest deposits per second.
    pub honest_rate: u32,
    /// How long the honest pair runs before the measured part of each phase.
    pub warmup: Duration,
    /// How long each attack (and the baseline's measured part) lasts.
    pub attack: Duration,
    /// Longest wait for the honest latency to come back after an attack.
    pub recover_within: Duration,
    /// Multiplies the number of attackers.
    pub scale: usize,
    /// Where to copy each phase's relay log (`<attack>.log`), if anywhere.
    pub log_dir: Option<PathBuf>,
    /// The honest pair runs on the attackers' core (above their priority) instead of on the
    /// relay's: the relay then has a core to itself, as it would on a server of its own, and
    /// the honest clients do not wait for the CPU the relay spends on the attack.
    pub honest_beside_attackers: bool,
}

impl Settings {
    /// The benchmark's settings: about 20 s per attack, under three minutes in all.
    pub fn full(relay_binary: PathBuf) -> Self {
        Self {
            relay_binary,
            limits: Limits::default(),
            honest_rate: 200,
            warmup: Duration::from_secs(2),
            attack: Duration::from_secs(8),
            recover_within: Duration::from_secs(8),
            scale: 5,
            log_dir: None,
            honest_beside_attackers: false,
        }
    }

    /// A short round for tests: small, debug-build friendly.
    pub fn quick(relay_binary: PathBuf) -> Self {
        Self {
            relay_binary,
            limits: Limits::default(),
            honest_rate: 50,
            warmup: Duration::from_millis(500),
            attack: Duration::from_secs(2),
            recover_within: Duration::from_secs(2),
            scale: 1,
            log_dir: None,
            honest_beside_attackers: false,
        }
    }
}

/// The targets each row is checked against.
pub mod targets {
    /// Most relay RSS growth during an attack, MiB.
    pub const RSS_GROWTH_MIB: f64 = 64.0;
    /// Most honest deposit p99 during an attack, as a multiple of the unattacked p99.
    pub const P99_RATIO: f64 = 2.0;
    /// Recovered: honest p99 within this multiple of the unattacked p99.
    pub const RECOVERED_RATIO: f64 = 1.2;
}

/// The figures of one phase (an attack, or the unattacked baseline).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The attack's name, or `baseline`.
    pub attack: String,
    /// What the attack does.
    pub description: String,
    /// Relay RSS before the attack, MiB.
    pub rss_before_mib: f64,
    /// Largest relay RSS growth during the attack, MiB.
    pub rss_growth_mib: f64,
    /// Honest deposit latency p99 during the attack, ms (messages still waiting at its end
    /// count with their age).
    pub honest_p99_ms: f64,
    /// Honest deposits first tried during the attack.
    pub honest_tried: usize,
    /// Honest deposits the relay refused (each retried after `retry_after_ms`).
    pub honest_refusals: u64,
    /// Honest messages stored by the relay and never received by the recipient.
    pub honest_lost: usize,
    /// Honest messages the relay never stored by the end of the phase (still being retried).
    pub honest_not_stored: usize,
    /// The relay's data directory on disk at the end, log included, bytes.
    pub disk_bytes: u64,
    /// The relay's log file, bytes.
    pub log_bytes: u64,
    /// Relay CPU time during the attack, seconds.
    pub cpu_secs: f64,
    /// CPU time of the benchmark's own process (attackers and honest pair, which share the
    /// machine's cores with the relay) during the attack, seconds.
    pub bench_cpu_secs: f64,
    /// Requests and connections the relay refused during the attack.
    pub refused: u64,
    /// Requests, streams and connections the attackers attempted.
    pub attempted: u64,
    /// Time from the attack's end until the honest p99 is back within
    /// [`targets::RECOVERED_RATIO`] of the baseline; `None` if not within the wait.
    pub recover_ms: Option<f64>,
}

impl Row {
    /// Relay CPU per refused request, microseconds.
    pub fn cpu_per_refusal_us(&self) -> Option<f64> {
        (self.refused > 0).then(|| self.cpu_secs * 1e6 / self.refused as f64)
    }
}

/// A whole run: the baseline, then one row per attack.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The unattacked relay.
    pub baseline: Row,
    /// The unattacked relay while the attackers' threads spin without sending anything: what
    /// sharing the machine with them costs the honest pair by itself.
    pub control: Row,
    /// One per attack.
    pub attacks: Vec<Row>,
    /// The relay's disk budget (mailbox and blobs), bytes.
    pub disk_budget_bytes: u64,
    /// The limits the relay ran with, as its TOML.
    pub relay_config: String,
    /// Honest deposits per second.
    pub honest_rate: u32,
    /// Seconds each attack lasted.
    pub attack_secs: f64,
}

/// One check of a row against its target.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// The figure.
    pub figure: &'static str,
    /// Its value, formatted.
    pub value: String,
    /// The target, formatted.
    pub target: String,
    /// Whether the value meets it (`None`: no target).
    pub pass: Option<bool>,
}

impl Report {
    /// The checks of `row` against the targets and this run's baseline.
    pub fn checks(&self, row: &Row) -> Vec<Check> {
        let base = self.baseline.honest_p99_ms.max(0.001);
        let disk_limit = self.disk_budget_bytes + row.log_bytes;
        vec![
            Check {
                figure: "relay RSS growth",
                value: format!("{:.1} MiB", row.rss_growth_mib),
                target: format!("≤ {} MiB", targets::RSS_GROWTH_MIB),
                pass: Some(row.rss_growth_mib <= targets::RSS_GROWTH_MIB),
            },
            Check {
                figure: "honest deposit p99",
                value: format!(
                    "{:.1} ms ({:.1}×; {:.1}× control)",
                    row.honest_p99_ms,
                    row.honest_p99_ms / base,
                    row.honest_p99_ms / self.control.honest_p99_ms.max(0.001)
                ),
                target: format!("≤ {:.1} ms (2× {base:.1})", base * targets::P99_RATIO),
                pass: Some(row.honest_p99_ms <= base * targets::P99_RATIO),
            },
            Check {
                figure: "honest lost / not stored",
                value: format!("{} / {}", row.honest_lost, row.honest_not_stored),
                target: "0 / 0".into(),
                pass: Some(row.honest_lost == 0 && row.honest_not_stored == 0),
            },
            Check {
                figure: "disk (log)",
                value: format!("{} ({})", mib(row.disk_bytes), mib(row.log_bytes)),
                target: format!("≤ {} + log", mib(self.disk_budget_bytes)),
                pass: Some(row.disk_bytes <= disk_limit),
            },
            Check {
                figure: "relay CPU / refused",
                value: format!(
                    "{:.2} s / {} = {}",
                    row.cpu_secs,
                    row.refused,
                    row.cpu_per_refusal_us()
                        .map_or("—".into(), |us| format!("{us:.0} µs each"))
                ),
                target: "—".into(),
                pass: None,
            },
            Check {
                figure: "recover",
                value: row.recover_ms.map_or_else(
                    || "not within the wait".into(),
                    |ms| format!("{:.1} s", ms / 1000.0),
                ),
                target: format!("p99 ≤ {}× baseline", targets::RECOVERED_RATIO),
                pass: Some(row.recover_ms.is_some()),
            },
        ]
    }

    /// Whether every row meets every target.
    pub fn all_pass(&self) -> bool {
        self.attacks
            .iter()
            .all(|r| self.checks(r).iter().all(|c| c.pass != Some(false)))
    }

    /// The table, in Markdown.
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut md = String::new();
        let b = &self.baseline;
        let _ = writeln!(
            md,
            "| attack | attempted | relay RSS growth (≤ {} MiB) | honest deposit p99 (≤ 2× baseline) | honest lost / not stored (0 / 0) | disk incl. log (≤ {} + log) | relay CPU; per refused request | recover (p99 ≤ {}× baseline) | bench CPU (attackers + honest) |",
            targets::RSS_GROWTH_MIB,
            mib(self.disk_budget_bytes),
            targets::RECOVERED_RATIO
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
        let _ = writeln!(
            md,
            "| baseline (no attack) | — | {:.1} MiB (of {:.0}) | {:.1} ms ({} deposits) | {} / {} | {} (log {}) | {:.2} s | — | {:.2} s |",
            b.rss_growth_mib,
            b.rss_before_mib,
            b.honest_p99_ms,
            b.honest_tried,
            b.honest_lost,
            b.honest_not_stored,
            mib(b.disk_bytes),
            mib(b.log_bytes),
            b.cpu_secs,
            b.bench_cpu_secs
        );
        let c = &self.control;
        let _ = writeln!(
            md,
            "| control: attackers' threads spin, no traffic | — | {:.1} MiB | {:.1} ms ({:.1}× baseline; no target) | {} / {} | {} (log {}) | {:.2} s | — | {:.2} s |",
            c.rss_growth_mib,
            c.honest_p99_ms,
            c.honest_p99_ms / b.honest_p99_ms.max(0.001),
            c.honest_lost,
            c.honest_not_stored,
            mib(c.disk_bytes),
            mib(c.log_bytes),
            c.cpu_secs,
            c.bench_cpu_secs
        );
        for row in &self.attacks {
            let checks = self.checks(row);
            let cell = |i: usize| {
                let c = &checks[i];
                match c.pass {
                    Some(true) => format!("{} ✅", c.value),
                    Some(false) => format!("{} ❌", c.value),
                    None => c.value.clone(),
                }
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} s |",
                row.attack,
                row.attempted,
                cell(0),
                cell(1),
                cell(2),
                cell(3),
                cell(4),
                cell(5),
                row.bench_cpu_secs
            );
        }
        md
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Runs the baseline, then each of `attacks`, printing progress on stderr.
pub async fn run(settings: &Settings, attacks: &[Attack]) -> Result<Report> {
    eprintln!("[attack] baseline: honest traffic only…");
    let baseline = phase(settings, None, None).await.context("baseline")?;
    eprintln!("      {}", summary(&baseline));
    eprintln!(
        "[attack] control: {}…",
        Attack::CpuOnly.describe(settings.scale)
    );
    let control = phase(settings, Some(Attack::CpuOnly), Some(&baseline))
        .await
        .context("control")?;
    eprintln!("      {}", summary(&control));
    let mut rows = Vec::new();
    for (i, attack) in attacks.iter().enumerate() {
        eprintln!(
            "[attack {}/{}] {}: {}…",
            i + 1,
            attacks.len(),
            attack.name(),
            attack.describe(settings.scale)
        );
        let row = phase(settings, Some(*attack), Some(&baseline))
            .await
            .with_context(|| attack.name())?;
        eprintln!("      {}", summary(&row));
        rows.push(row);
    }
    Ok(Report {
        baseline,
        control,
        attacks: rows,
        disk_budget_bytes: settings.limits.disk_budget_bytes(),
        relay_config: settings
            .limits
            .toml("127.0.0.1:0".parse().context("an address")?)
            .lines()
            .filter(|l| !l.starts_with("metrics_addr"))
            .collect::<Vec<_>>()
            .join("\n"),
        honest_rate: settings.honest_rate,
        attack_secs: settings.attack.as_secs_f64(),
    })
}

fn summary(row: &Row) -> String {
    format!(
        "RSS +{:.1} MiB, honest p99 {:.1} ms ({} tried, {} refused), lost {}, not stored {}, disk {} (log {}), CPU {:.2} s, refused {} of {} attempted, recover {:?} ms",
        row.rss_growth_mib,
        row.honest_p99_ms,
        row.honest_tried,
        row.honest_refusals,
        row.honest_lost,
        row.honest_not_stored,
        mib(row.disk_bytes),
        mib(row.log_bytes),
        row.cpu_secs,
        row.refused,
        row.attempted,
        row.recover_ms.map(|ms| ms.round())
    )
}

/// How often the relay's memory is sampled, and the recovery checked.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The window of honest deposits whose p99 decides recovery.
const RECOVERY_WINDOW: Duration = Duration::from_millis(500);

/// How long the end of a phase waits for waiting deposits to be stored and stored ones to be
/// received.
const DRAIN_WITHIN: Duration = Duration::from_secs(10);

/// The CPUs this process may use, split in two: the attackers' (the last one) and the rest,
/// for the relay and the honest pair. `None` on a single CPU (nothing is pinned then).
///
/// Attackers elsewhere do not take the relay's CPU; here they share the machine, and two threads
/// spinning on the relay's core alone triple the honest p99 (the control phase shows it), while
/// spinning on another core changes nothing. So the attackers get a core of their own and the
/// relay the others, in the baseline and the attacks alike: what their traffic costs the relay
/// still counts in full.
pub fn cpu_split() -> Option<(CpuSet, CpuSet)> {
    let allowed = rustix::thread::sched_getaffinity(None).ok()?;
    let cpus: Vec<usize> = (0..CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .collect();
    let (&last, rest) = cpus.split_last()?;
    if rest.is_empty() {
        return None;
    }
    let mut attackers = CpuSet::new();
    attackers.set(last);
    let mut relay = CpuSet::new();
    for &c in rest {
        relay.set(c);
    }
    Some((relay, attackers))
}

/// Keeps the calling thread (and the processes it starts) on `cpus`.
pub fn pin(cpus: &CpuSet) {
    if let Err(e) = rustix::thread::sched_setaffinity(None, cpus) {
        tracing::warn!(error = %e, "cannot pin a benchmark thread to its CPUs");
    }
}

/// The runtime the attackers run on: its threads run on a core of their own (see [`cpu_split`])
/// and at the lowest CPU priority (`nice` 19), so that what the attackers themselves spend (key
/// generation, handshakes, encoding) does not take the relay's or the honest pair's CPU.
fn attackers_runtime() -> Result<Attackers> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("attacker")
        .on_thread_start(|| {
            if let Some((_, attackers)) = cpu_split() {
                pin(&attackers);
            }
            // On Linux a thread's nice value is its own: this lowers only the calling thread.
            if let Err(e) = rustix::process::setpriority_process(None, 19) {
                tracing::warn!(error = %e, "cannot lower an attacker thread's priority");
            }
        })
        .enable_all()
        .build()?;
    Ok(Attackers(Some(runtime)))
}

/// The attackers' runtime, shut down without waiting when dropped (as it is, inside the
/// benchmark's own runtime).
struct Attackers(Option<tokio::runtime::Runtime>);

impl Attackers {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle()
    }
}

impl Drop for Attackers {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Samples `rss` every [`SAMPLE_EVERY`] until `duration` has passed since `started`: the highest
/// value seen, `from` included.
async fn peak_rss(
    started: Instant,
    duration: Duration,
    from: u64,
    rss: impl Fn() -> Result<u64>,
) -> Result<u64> {
    let mut peak = from;
    while started.elapsed() < duration {
        tokio::time::sleep(SAMPLE_EVERY).await;
        peak = peak.max(rss()?);
    }
    Ok(peak)
}

async fn phase(settings: &Settings, attack: Option<Attack>, baseline: Option<&Row>) -> Result<Row> {
    let attackers = attackers_runtime()?;
    let relay = Relay::spawn(&settings.relay_binary, &settings.limits).await?;
    let honest = Honest::start(
        relay.peer,
        relay.addr.clone(),
        settings.honest_rate,
        settings.honest_beside_attackers,
    )?;
    // The pair is up once a first message went all the way.
    crate::wait_for("the honest pair's first message", || async {
        let s = honest.stats();
        (!s.deposited.is_empty() && s.missing() == 0 && !s.received.is_empty()).then_some(())
    })
    .await?;
    tokio::time::sleep(settings.warmup).await;
    let target = Target {
        peer: relay.peer,
        addr: relay.addr.clone(),
        victim: honest.recipient(),
        mailbox_max_messages: settings.limits.mailbox_max_messages,
        mailbox_max_messages_per_sender: settings.limits.mailbox_max_messages_per_sender,
        blob_max_file_bytes: settings.limits.blob_max_file_bytes,
    };

    let rss_before = relay.rss_kib()?;
    let cpu_before = relay.cpu()?;
    let bench_cpu_before = relay::cpu_of(std::process::id())?;
    let refused_before = relay.refused().await?;
    let counters = Arc::new(Counters::default());
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    if let Some(attack) = attack {
        attacks::launch(
            attack,
            &target,
            settings.scale,
            &counters,
            &mut tasks,
            attackers.handle(),
        );
    }
    let mut rss_peak = peak_rss(started, settings.attack, rss_before, || relay.rss_kib()).await?;
    tasks.shutdown().await;
    let stopped = Instant::now();
    let cpu = relay.cpu()?.saturating_sub(cpu_before);
    let bench_cpu = relay::cpu_of(std::process::id())?.saturating_sub(bench_cpu_before);
    let refused = relay.refused().await?.saturating_sub(refused_before);
    rss_peak = rss_peak.max(relay.rss_kib()?);
    let (p99, tried, refusals_during) = {
        let s = honest.stats();
        let during = s.latencies(started, stopped, stopped);
        // Where in the phase the slow deposits were: p99 / max of each half second.
        let mut windows = String::new();
        let mut from = started;
        while from < stopped {
            let window = s.latencies(from, from + RECOVERY_WINDOW, stopped);
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let max = window.last().copied().unwrap_or_default();
            windows += &format!(" {:.1}/{:.1}", ms(percentile(&window, 99.0)), ms(max));
            from += RECOVERY_WINDOW;
        }
        eprintln!("      honest p99/max ms per {RECOVERY_WINDOW:?}:{windows}");
        (percentile(&during, 99.0), during.len(), s.refusals)
    };

    // Recovery: the first window after the attack whose p99 is near the baseline's.
    let recover_ms = match baseline {
        None => None,
        Some(base) => {
            let limit =
                Duration::from_secs_f64(base.honest_p99_ms / 1000.0 * targets::RECOVERED_RATIO);
            let mut found = None;
            while stopped.elapsed() < settings.recover_within + RECOVERY_WINDOW {
                tokio::time::sleep(SAMPLE_EVERY).await;
                let now = Instant::now();
                // Deposits tried in the window that ended a window ago, so that each had a
                // window's time to be answered (a slower one counts with its age).
                let Some(from) = now.checked_sub(RECOVERY_WINDOW * 2) else {
                    continue;
                };
                if from < stopped {
                    continue;
                }
                let window = honest.stats().latencies(from, from + RECOVERY_WINDOW, now);
                if !window.is_empty() && percentile(&window, 99.0) <= limit {
                    found = Some((from + RECOVERY_WINDOW - stopped).as_secs_f64() * 1000.0);
                    break;
                }
            }
            found
        }
    };

    // Drain: no new messages; everything stored must arrive.
    honest.stop_sending();
    let drained = Instant::now();
    while drained.elapsed() < DRAIN_WITHIN {
        {
            let s = honest.stats();
            if s.waiting.is_empty() && s.missing() == 0 {
                break;
            }
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let (lost, not_stored, refusals) = {
        let s = honest.stats();
        (s.missing(), s.waiting.len(), s.refusals)
    };
    honest.finish()?;
    let log = relay.log.clone();
    let row = Row {
        attack: attack.map_or("baseline".into(), |a| a.name().into()),
        description: attack.map_or("honest traffic only".into(), |a| a.describe(settings.scale)),
        rss_before_mib: rss_before as f64 / 1024.0,
        rss_growth_mib: rss_peak.saturating_sub(rss_before) as f64 / 1024.0,
        honest_p99_ms: p99.as_secs_f64() * 1000.0,
        honest_tried: tried,
        honest_refusals: refusals.max(refusals_during),
        honest_lost: lost,
        honest_not_stored: not_stored,
        disk_bytes: relay.disk_bytes(),
        log_bytes: relay.log_bytes(),
        cpu_secs: cpu.as_secs_f64(),
        bench_cpu_secs: bench_cpu.as_secs_f64(),
        refused,
        attempted: counters.sent.load(Ordering::Relaxed),
        recover_ms,
    };
    let _dir = relay.stop()?;
    if let Some(dir) = &settings.log_dir {
        std::fs::create_dir_all(dir)?;
        std::fs::copy(&log, dir.join(format!("{}.log", row.attack)))?;
    }
    Ok(row)
}
