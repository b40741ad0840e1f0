//! A `request_response::Codec` over kith's framing and ciborium.
//!
//! Reading: the 4-byte length is checked against the protocol's maximum for that direction
//! (requests and responses have limits of their own) before anything is allocated; a frame that
//! is too large or does not decode becomes [`Message::Invalid`] (inbound requests) or an I/O
//! error (responses), never a panic.
//!
//! Memory is committed as bytes arrive, never for a length a peer merely claims: the buffer
//! grows a [`READ_STEP_BYTES`] step at a time (doubling its capacity at most, never past the
//! claimed length), so a peer that claims large frames and trickles bytes holds at most about
//! twice what it sent plus one step per stream. Every byte of a frame being read is counted in
//! [`buffered_bytes`] (process-wide) and in the codec's [`Budget`], if it has one: a relay gives
//! all its streams one budget, and a frame that would take it past its cap is refused with
//! `Busy` before more is read. A budget may give each connection a reserve of its own and a cap
//! (see [`Budget::with_connection_shares`]), so that one peer's claims cannot starve another's
//! frames.

use std::io;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use kith_protocol::limits::FRAME_HEADER_BYTES;
use kith_protocol::{cbor, frame, Reject};
use libp2p::StreamProtocol;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// An inbound or outbound request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<T> {
    /// A request that decoded.
    Valid(T),
    /// An inbound frame that was refused before or while decoding; answer with `reason`.
    Invalid {
        /// The typed reason to send back.
        reason: Reject,
        /// What was wrong, for the log.
        detail: String,
    },
    /// Bytes written to the stream as they are, header included. Used by tests and tools that
    /// need to send hostile input through a real connection; never produced by reading.
    Raw(Vec<u8>),
}

/// The codec: `Req` and `Resp` are CBOR inside frames of at most `max_request_bytes` and
/// `max_response_bytes`.
#[derive(Debug)]
pub struct Codec<Req, Resp> {
    max_request_bytes: usize,
    max_response_bytes: usize,
    budget: Option<Budget>,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Clone for Codec<Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            max_request_bytes: self.max_request_bytes,
            max_response_bytes: self.max_response_bytes,
            budget: self.budget.clone(),
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> Codec<Req, Resp> {
    /// A codec that refuses frames above `max_frame_bytes`, in both directions.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self::with_limits(max_frame_bytes, max_frame_bytes)
    }

    /// A codec that refuses requests above `max_request_bytes` and responses above
    /// `max_response_bytes`.
    pub fn with_limits(max_request_bytes: usize, max_response_bytes: usize) -> Self {
        Self {
            max_request_bytes,
            max_response_bytes,
            budget: None,
            _types: PhantomData,
        }
    }

    /// The same codec, counting the frames it reads against `budget`.
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = Some(budget);
        self
    }
}

/// Bytes held by frames being read in this process, whatever their codec.
static BUFFERED: AtomicUsize = AtomicUsize::new(0);

/// Bytes held right now by frames being read (buffers allocated for frames not yet decoded and
/// dropped), in this whole process.
pub fn buffered_bytes() -> usize {
    BUFFERED.load(Ordering::Relaxed)
}

/// A cap on the bytes that frames being read may hold together, shared by every stream of the
/// codecs that carry it (clones share the count).
///
/// A budget may also be split among connections ([`Budget::with_connection_shares`] and
/// [`Budget::for_connection`]): each connection then has a reserve of its own that no other
/// connection can spend, so a peer holding many streams with large claims cannot starve another
/// connection's small frames, and a cap on what one connection may hold, reserve included, so
/// that spending the shared pool takes many connections. The memory held is then at most the
/// shared cap plus one reserve per open connection.
#[derive(Debug, Clone)]
pub struct Budget {
    inner: Arc<BudgetInner>,
    connection: Option<Arc<Connection>>,
}

#[derive(Debug)]
struct BudgetInner {
    max_bytes: usize,
    retry_after_ms: u64,
    reserved_per_connection: usize,
    max_per_connection: usize,
    /// Bytes held from the shared pool.
    held: AtomicUsize,
    /// Bytes held from connections' reserves.
    reserved_held: AtomicUsize,
    frames: AtomicUsize,
    peak: AtomicUsize,
    refused: AtomicU64,
    refused_connection_cap: AtomicU64,
}

/// One connection's share: the bytes its frames hold, reserve and pool together.
#[derive(Debug, Default)]
struct Connection {
    held: Mutex<usize>,
}

impl Budget {
    /// At most `max_bytes` held at once; a frame refused for the budget asks its sender to come
    /// back after `retry_after_ms`.
    pub fn new(max_bytes: usize, retry_after_ms: u64) -> Self {
        Self {
            inner: Arc::new(BudgetInner {
                max_bytes,
                retry_after_ms,
                reserved_per_connection: 0,
                max_per_connection: usize::MAX,
                held: AtomicUsize::new(0),
                reserved_held: AtomicUsize::new(0),
                frames: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                refused: AtomicU64::new(0),
                refused_connection_cap: AtomicU64::new(0),
            }),
            connection: None,
        }
    }

    /// The same budget where each connection's frames (those read through a
    /// [`Budget::for_connection`] handle) first use `reserved_bytes` of their own, outside the
    /// shared cap, and hold at most `max_per_connection_bytes` in all. Call before any clone:
    /// clones made earlier keep the settings they were made with.
    pub fn with_connection_shares(
        mut self,
        reserved_bytes: usize,
        max_per_connection_bytes: usize,
    ) -> Self {
        let inner = &self.inner;
        self.inner = Arc::new(BudgetInner {
            max_bytes: inner.max_bytes,
            retry_after_ms: inner.retry_after_ms,
            reserved_per_connection: reserved_bytes,
            max_per_connection: max_per_connection_bytes,
            held: AtomicUsize::new(0),
            reserved_held: AtomicUsize::new(0),
            frames: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            refused_connection_cap: AtomicU64::new(0),
        });
        self
    }

    /// A handle on the same budget for one more connection: frames read through it (and its
    /// clones) share that connection's reserve and cap.
    pub fn for_connection(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            connection: Some(Arc::new(Connection::default())),
        }
    }

    /// Bytes held now, shared pool and connections' reserves together.
    pub fn held_bytes(&self) -> usize {
        self.inner.held.load(Ordering::Relaxed) + self.reserved_bytes()
    }

    /// Bytes held now from connections' reserves (outside the shared cap).
    pub fn reserved_bytes(&self) -> usize {
        self.inner.reserved_held.load(Ordering::Relaxed)
    }

    /// Bytes held now by this handle's connection (0 for a handle of no connection).
    pub fn connection_bytes(&self) -> usize {
        self.connection.as_ref().map_or(0, |c| *lock(&c.held))
    }

    /// Frames being read that hold bytes now (their header has arrived).
    pub fn frames(&self) -> usize {
        self.inner.frames.load(Ordering::Relaxed)
    }

    /// The most bytes held from the shared pool at once so far.
    pub fn peak_bytes(&self) -> usize {
        self.inner.peak.load(Ordering::Relaxed)
    }

    /// Frames refused because the shared budget was spent.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Frames refused because their connection held its most already.
    pub fn refused_for_connection_cap(&self) -> u64 {
        self.inner.refused_connection_cap.load(Ordering::Relaxed)
    }

    /// The cap.
    pub fn max_bytes(&self) -> usize {
        self.inner.max_bytes
    }

    /// Takes `bytes` from the shared pool alone.
    fn try_take_shared(&self, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let inner = &self.inner;
        let taken = inner
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(bytes).filter(|&n| n <= inner.max_bytes)
            });
        match taken {
            Ok(before) => {
                inner.peak.fetch_max(before + bytes, Ordering::Relaxed);
                true
            }
            Err(_) => {
                inner.refused.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    fn try_take(&self, bytes: usize) -> bool {
        let Some(connection) = &self.connection else {
            return self.try_take_shared(bytes);
        };
        let inner = &self.inner;
        // One lock per connection keeps its split between reserve and pool exact: the pool
        // holds whatever the connection holds beyond its reserve.
        let mut held = lock(&connection.held);
        let after = match held.checked_add(bytes) {
            Some(after) if after <= inner.max_per_connection => after,
            _ => {
                inner.refused_connection_cap.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        };
        let (reserve, shared) = split(*held, after, inner.reserved_per_connection);
        if !self.try_take_shared(shared) {
            return false;
        }
        inner.reserved_held.fetch_add(reserve, Ordering::Relaxed);
        *held = after;
        true
    }

    fn give_back(&self, bytes: usize) {
        let Some(connection) = &self.connection else {
            self.inner.held.fetch_sub(bytes, Ordering::Relaxed);
            return;
        };
        let mut held = lock(&connection.held);
        let after = held.saturating_sub(bytes);
        let (reserve, shared) = split(after, *held, self.inner.reserved_per_connection);
        self.inner.held.fetch_sub(shared, Ordering::Relaxed);
        self.inner
            .reserved_held
            .fetch_sub(reserve, Ordering::Relaxed);
        *held = after;
    }
}

/// How the bytes between `from` and `to` (a connection's holding, `from` ≤ `to`) divide between
/// its reserve of `reserved` bytes (filled first) and the shared pool.
fn split(from: usize, to: usize, reserved: usize) -> (usize, usize) {
    let reserve = to.min(reserved).saturating_sub(from.min(reserved));
    (reserve, to - from - reserve)
}

/// The lock's value even if a thread panicked holding it: a count stays a count.
fn lock(mutex: &Mutex<usize>) -> std::sync::MutexGuard<'_, usize> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The bytes a frame being read holds, counted process-wide and against its budget until the
/// frame is dropped.
struct Held<'a> {
    budget: Option<&'a Budget>,
    bytes: usize,
}

impl<'a> Held<'a> {
    fn new(budget: Option<&'a Budget>) -> Self {
        Self { budget, bytes: 0 }
    }

    /// Counts the buffer at `bytes` of capacity; `false` (nothing more counted) when that is
    /// beyond the budget.
    fn grow_to(&mut self, bytes: usize) -> bool {
        let more = bytes.saturating_sub(self.bytes);
        if more == 0 {
            return true;
        }
        if let Some(budget) = self.budget {
            if !budget.try_take(more) {
                return false;
            }
            if self.bytes == 0 {
                budget.inner.frames.fetch_add(1, Ordering::Relaxed);
            }
        }
        BUFFERED.fetch_add(more, Ordering::Relaxed);
        self.bytes += more;
        true
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        BUFFERED.fetch_sub(self.bytes, Ordering::Relaxed);
        if let Some(budget) = self.budget {
            budget.give_back(self.bytes);
            if self.bytes > 0 {
                budget.inner.frames.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// What went wrong reading one frame.
enum ReadError {
    Io(io::Error),
    TooLarge { len: usize, max: usize },
    OverBudget { retry_after_ms: u64 },
}

/// Reads one frame of at most `max` bytes. The buffer grows with the bytes received, a step at
/// a time, and is counted in `held` until the caller drops it.
async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
    held: &mut Held<'_>,
) -> Result<Vec<u8>, ReadError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    io.read_exact(&mut header).await.map_err(ReadError::Io)?;
    let len = match frame::payload_len(header, max) {
        Ok(len) => len,
        Err(frame::FrameError::TooLarge { len, max }) => {
            return Err(ReadError::TooLarge { len, max })
        }
    };
    let mut payload: Vec<u8> = Vec::new();
    while payload.len() < len {
        let start = payload.len();
        let end = start + (len - start).min(READ_STEP_BYTES);
        if payload.capacity() < end {
            // Double (amortised copies for large frames the peer does send) but never past the
            // claimed length, and never more than one step beyond what has arrived.
            let capacity = (payload.capacity() * 2).clamp(end, len);
            if !held.grow_to(capacity) {
                return Err(ReadError::OverBudget {
                    retry_after_ms: held.budget.map_or(0, |b| b.inner.retry_after_ms),
                });
            }
            payload.reserve_exact(capacity - start);
        }
        payload.resize(end, 0);
        io.read_exact(&mut payload[start..end])
            .await
            .map_err(|e| eof(e, start, len))?;
    }
    Ok(payload)
}

/// How much more of a frame is read (and allocated) at a time: memory a peer can make us commit
/// per stream before it has sent the bytes to fill it.
pub const READ_STEP_BYTES: usize = 16 * 1024;

/// An early end of stream, saying how far the frame got.
fn eof(e: io::Error, from: usize, len: usize) -> ReadError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ReadError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame of {len} bytes ended early (after at least {from})"),
        ))
    } else {
        ReadError::Io(e)
    }
}

async fn write_frame<T: AsyncWrite + Unpin + Send, V: Serialize>(
    io: &mut T,
    value: &V,
    max: usize,
) -> io::Result<()> {
    let framed = cbor::encode_framed(value, max).map_err(io::Error::other)?;
    io.write_all(&framed).await?;
    io.close().await
}

impl<Req, Resp> libp2p::request_response::Codec for Codec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + Sync + 'static,
    Resp: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Message<Req>;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Message<Req>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut held = Held::new(self.budget.as_ref());
        let payload = match read_frame(io, self.max_request_bytes, &mut held).await {
            Ok(payload) => payload,
            Err(ReadError::Io(e)) => return Err(e),
            Err(ReadError::TooLarge { len, max }) => {
                return Ok(Message::Invalid {
                    reason: Reject::TooLarge { max: max as u64 },
                    detail: format!("frame header claims {len} bytes, limit {max}"),
                })
            }
            Err(ReadError::OverBudget { retry_after_ms }) => {
                return Ok(Message::Invalid {
                    reason: Reject::Busy { retry_after_ms },
                    detail: "frames being read hold the whole memory budget".into(),
                })
            }
        };
        Ok(match cbor::decode(&payload, self.max_request_bytes) {
            Ok(request) => Message::Valid(request),
            Err(e) => Message::Invalid {
                reason: Reject::Malformed,
                detail: e.to_string(),
            },
        })
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut held = Held::new(self.budget.as_ref());
        let payload = match read_frame(io, self.max_response_bytes, &mut held).await {
            Ok(payload) => payload,
            Err(ReadError::Io(e)) => return Err(e),
            Err(ReadError::TooLarge { len, max }) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("response frame of {len} bytes exceeds {max}"),
                ))
            }
            Err(ReadError::OverBudget { .. }) => {
                return Err(io::Error::other(
                    "frames being read hold the whole memory budget",
                ))
            }
        };
        cbor::decode(&payload, self.max_response_bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Message<Req>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match request {
            Message::Valid(request) => write_frame(io, &request, self.max_request_bytes).await,
            Message::Raw(bytes) => {
                io.write_all(&bytes).await?;
                io.close().await
            }
            Message::Invalid { detail, .. } => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("refusing to send an invalid request: {detail}"),
            )),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &response, self.max_response_bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use kith_protocol::dm;
    use libp2p::request_response::Codec as _;

    fn proto() -> StreamProtocol {
        StreamProtocol::new(dm::PROTOCOL)
    }

    async fn read(bytes: Vec<u8>) -> io::Result<Message<dm::Request>> {
        let mut codec = crate::DmCodec::new(dm::MAX_FRAME_BYTES);
        codec.read_request(&proto(), &mut Cursor::new(bytes)).await
    }

    #[tokio::test]
    async fn responses_round_trip() {
        let mut codec = crate::DmCodec::new(dm::MAX_FRAME_BYTES);
        let mut buf = Cursor::new(Vec::new());
        codec
            .write_response(&proto(), &mut buf, dm::Response::Accepted { req_id: 5 })
            .await
            .expect("write");
        let back = codec
            .read_response(&proto(), &mut Cursor::new(buf.into_inner()))
            .await
            .expect("read");
        assert_eq!(back, dm::Response::Accepted { req_id: 5 });
    }

    #[tokio::test]
    async fn oversize_header_becomes_a_typed_reject() {
        let header = (u32::MAX).to_be_bytes().to_vec();
        match read(header).await.expect("typed") {
            Message::Invalid { reason, .. } => assert_eq!(
                reason,
                Reject::TooLarge {
                    max: dm::MAX_FRAME_BYTES as u64
                }
            ),
            other => panic!("expected a reject, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn garbage_becomes_malformed() {
        let framed = frame::encode(&[0xff, 0x00, 0x13], 16).expect("frame");
        assert!(matches!(
            read(framed).await.expect("typed"),
            Message::Invalid {
                reason: Reject::Malformed,
                ..
            }
        ));
    }

    /// Gives its bytes, then never anything more: a peer that claimed a frame and stalls.
    struct Stalls(Cursor<Vec<u8>>);

    impl AsyncRead for Stalls {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            match std::pin::Pin::new(&mut self.0).poll_read(cx, buf) {
                std::task::Poll::Ready(Ok(0)) => std::task::Poll::Pending,
                other => other,
            }
        }
    }

    #[test]
    fn memory_grows_with_the_bytes_received_not_the_claimed_length() {
        let budget = Budget::new(usize::MAX, 0);
        let mut codec = crate::DmCodec::new(dm::MAX_FRAME_BYTES).with_budget(budget.clone());
        let sent = 1_000;
        let mut bytes = (dm::MAX_FRAME_BYTES as u32).to_be_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(7u8, sent));
        let mut stalls = Stalls(Cursor::new(bytes));
        let protocol = proto();
        let mut read = Box::pin(codec.read_request(&protocol, &mut stalls));
        assert!(futures::FutureExt::now_or_never(&mut read).is_none());
        // The claim is about 322 KiB; what is held is one step.
        assert!(budget.held_bytes() >= sent);
        assert!(
            budget.held_bytes() <= READ_STEP_BYTES,
            "{}",
            budget.held_bytes()
        );
        assert_eq!(budget.frames(), 1);
        drop(read);
        assert_eq!(budget.held_bytes(), 0);
        assert_eq!(budget.frames(), 0);
    }

    #[tokio::test]
    async fn a_large_frame_that_arrives_is_read_whole() {
        let payload = vec![9u8; dm::MAX_FRAME_BYTES - 8];
        let framed = frame::encode(&payload, dm::MAX_FRAME_BYTES).expect("frame");
        let budget = Budget::new(usize::MAX, 0);
        let mut held = Held::new(Some(&budget));
        let read = read_frame(&mut Cursor::new(framed), dm::MAX_FRAME_BYTES, &mut held).await;
        assert!(matches!(read, Ok(ref p) if *p == payload));
        // Capacity never beyond the frame.
        assert!(budget.peak_bytes() <= payload.len());
    }

    #[test]
    fn a_spent_budget_refuses_the_frame_with_busy() {
        let budget = Budget::new(READ_STEP_BYTES + 10, 750);
        let mut codec = crate::DmCodec::new(dm::MAX_FRAME_BYTES).with_budget(budget.clone());
        let mut first = (dm::MAX_FRAME_BYTES as u32).to_be_bytes().to_vec();
        first.extend(std::iter::repeat_n(1u8, 10));
        let mut stalls = Stalls(Cursor::new(first));
        let mut other = codec.clone();
        let protocol = proto();
        let mut holding = Box::pin(codec.read_request(&protocol, &mut stalls));
        assert!(futures::FutureExt::now_or_never(&mut holding).is_none());
        let second = (dm::MAX_FRAME_BYTES as u32).to_be_bytes().to_vec();
        let refused = futures::executor::block_on(
            other.read_request(&proto(), &mut Stalls(Cursor::new(second))),
        );
        assert!(matches!(
            refused,
            Ok(Message::Invalid {
                reason: Reject::Busy {
                    retry_after_ms: 750
                },
                ..
            })
        ));
        assert_eq!(budget.refused(), 1);
    }

    /// Reads, through `codec`, a frame claiming `dm::MAX_FRAME_BYTES` of which 10 bytes arrive:
    /// the read stalls and holds its bytes until the future is dropped.
    async fn hold_large_claim(mut codec: crate::DmCodec) -> io::Result<Message<dm::Request>> {
        let mut claim = (dm::MAX_FRAME_BYTES as u32).to_be_bytes().to_vec();
        claim.extend(std::iter::repeat_n(1u8, 10));
        let mut stalls = Stalls(Cursor::new(claim));
        codec.read_request(&proto(), &mut stalls).await
    }

    /// Reads one small, complete (undecodable) frame through `codec`.
    fn read_small(codec: &mut crate::DmCodec) -> Message<dm::Request> {
        let framed = frame::encode(&[0xff; 400], 1024).expect("frame");
        futures::executor::block_on(codec.read_request(&proto(), &mut Cursor::new(framed)))
            .expect("read")
    }

    #[test]
    fn a_connections_reserve_is_read_when_others_spent_the_shared_budget() {
        let relay =
            Budget::new(READ_STEP_BYTES - 4096, 750).with_connection_shares(4096, usize::MAX);
        let hostile = relay.for_connection();
        let a = crate::DmCodec::new(dm::MAX_FRAME_BYTES).with_budget(hostile.clone());
        let mut c = a.clone();
        // Its first claim takes the reserve and the rest of its step, the whole pool, from the
        // pool; its second claim and its small frame find the pool spent.
        let mut first = Box::pin(hold_large_claim(a.clone()));
        assert!(futures::FutureExt::now_or_never(&mut first).is_none());
        assert_eq!(relay.reserved_bytes(), 4096);
        let mut second = Box::pin(hold_large_claim(a.clone()));
        assert!(matches!(
            futures::FutureExt::now_or_never(&mut second),
            Some(Ok(Message::Invalid {
                reason: Reject::Busy { .. },
                ..
            }))
        ));
        assert!(matches!(
            read_small(&mut c),
            Message::Invalid {
                reason: Reject::Busy { .. },
                ..
            }
        ));
        // Another connection's small frame is read from its own reserve.
        let mut honest =
            crate::DmCodec::new(dm::MAX_FRAME_BYTES).with_budget(relay.for_connection());
        assert!(matches!(
            read_small(&mut honest),
            Message::Invalid {
                reason: Reject::Malformed,
                ..
            }
        ));
        assert_eq!(relay.refused(), 2);
        drop(first);
        drop(second);
        assert_eq!(relay.held_bytes(), 0);
        assert_eq!(relay.reserved_bytes(), 0);
        assert_eq!(hostile.connection_bytes(), 0);
    }

    #[test]
    fn one_connection_holds_at_most_its_cap() {
        let relay = Budget::new(usize::MAX, 750).with_connection_shares(0, READ_STEP_BYTES + 100);
        let a = crate::DmCodec::new(dm::MAX_FRAME_BYTES).with_budget(relay.for_connection());
        let mut first = Box::pin(hold_large_claim(a.clone()));
        assert!(futures::FutureExt::now_or_never(&mut first).is_none());
        let mut second = Box::pin(hold_large_claim(a.clone()));
        assert!(matches!(
            futures::FutureExt::now_or_never(&mut second),
            Some(Ok(Message::Invalid {
                reason: Reject::Busy { .. },
                ..
            }))
        ));
        assert_eq!(relay.refused_for_connection_cap(), 1);
        assert_eq!(relay.refused(), 0);
        let mut other =
            crate::DmCodec::new(dm::MAX_FRAME_BYTES).with_budget(relay.for_connection());
        assert!(matches!(
            read_small(&mut other),
            Message::Invalid {
                reason: Reject::Malformed,
                ..
            }
        ));
        drop(first);
        assert_eq!(relay.held_bytes(), 0);
    }

    #[test]
    fn the_split_between_reserve_and_pool_is_exact() {
        assert_eq!(split(0, 10, 4), (4, 6));
        assert_eq!(split(2, 3, 4), (1, 0));
        assert_eq!(split(5, 9, 4), (0, 4));
        assert_eq!(split(3, 3, 4), (0, 0));
        assert_eq!(split(0, 10, 0), (0, 10));
    }

    #[tokio::test]
    async fn requests_and_responses_have_their_own_limits() {
        let mut codec = crate::DmCodec::with_limits(64, 1024);
        let response = dm::Response::Accepted { req_id: 5 };
        let mut buf = Cursor::new(Vec::new());
        codec
            .write_response(&proto(), &mut buf, response.clone())
            .await
            .expect("write");
        let framed = buf.into_inner();
        let back = codec
            .read_response(&proto(), &mut Cursor::new(framed))
            .await
            .expect("read");
        assert_eq!(back, response);
        let big = (65u32).to_be_bytes().to_vec();
        assert!(matches!(
            codec.read_request(&proto(), &mut Cursor::new(big)).await,
            Ok(Message::Invalid {
                reason: Reject::TooLarge { max: 64 },
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_short_frame_is_an_io_error() {
        let mut framed = frame::encode(&[1, 2, 3, 4], 16).expect("frame");
        framed.truncate(6);
        assert_eq!(
            read(framed).await.expect_err("short").kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
