//! New TCP connections of the whole relay, paced: beyond `new_connections_per_sec` (after a
//! burst of `new_connection_burst`), the relay stops accepting for as long as the next one
//! takes to be allowed, and connections wait in the kernel's listen backlog meanwhile.
//!
//! Every connection the relay accepts costs it an accept, a close and bookkeeping in libp2p
//! (about 100 µs here), even one that the per-IP rate ([`crate::ip_rate`]) then closes before
//! its handshake. A flood of connections, each from a fresh identity and from any number of
//! addresses, could keep the relay's core busy with that alone, and the honest users'
//! requests on their established connections would wait behind it. Paced, a flood costs the
//! relay at most the pace: what is beyond it stays in the backlog, and once the backlog is
//! full the kernel drops the handshakes and the dialers back off. Established connections are
//! not affected; a user connecting during a flood waits for its turn instead of being
//! refused. Each pause counts as `limit_hits{limit="new_connections_rate"}`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::core::transport::{DialOpts, ListenerId, TransportError, TransportEvent};
use libp2p::core::Transport;
use libp2p::Multiaddr;

use crate::mailbox::rate::TokenBucket;
use crate::metrics::Metrics;

/// A transport whose incoming connections are taken at most at a pace.
pub struct Paced<T> {
    inner: T,
    bucket: TokenBucket,
    per_sec: u32,
    burst: u32,
    start: Instant,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    metrics: Metrics,
}

impl<T> Paced<T> {
    /// `inner`, taking `per_sec` new incoming connections a second after a burst of `burst`
    /// (both above 0: the config checks).
    pub fn new(inner: T, per_sec: u32, burst: u32, metrics: Metrics) -> Self {
        Self {
            inner,
            bucket: TokenBucket::full(burst, 0),
            per_sec: per_sec.max(1),
            burst: burst.max(1),
            start: Instant::now(),
            pause: None,
            metrics,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts a connection taken now; when it was one beyond the pace, accepting pauses until
    /// the next one is allowed.
    fn took_one(&mut self) {
        let now = self.now_ms();
        if self.bucket.try_take(self.burst, self.per_sec, now) {
            return;
        }
        // Already accepted by the listener, so it goes on (the per-IP rate still applies);
        // the next ones wait.
        self.metrics.limit_hit("new_connections_rate");
        let wait = Duration::from_millis((1_000 / u64::from(self.per_sec)).max(1));
        self.pause = Some(Box::pin(tokio::time::sleep(wait)));
    }
}

impl<T> Transport for Paced<T>
where
    T: Transport + Unpin,
{
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        self.inner.dial(addr, opts)
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        let this = self.get_mut();
        // While paused, the listeners are not polled, so nothing is accepted (their other
        // events wait the few milliseconds too).
        if let Some(pause) = this.pause.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.pause = None;
        }
        let event = match Pin::new(&mut this.inner).poll(cx) {
            Poll::Ready(event) => event,
            Poll::Pending => return Poll::Pending,
        };
        if matches!(event, TransportEvent::Incoming { .. }) {
            this.took_one();
        }
        Poll::Ready(event)
    }
}
