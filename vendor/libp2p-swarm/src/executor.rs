//! Provides executors for spawning background tasks.
use std::{future::Future, pin::Pin};

use futures::executor::ThreadPool;
use libp2p_identity::PeerId;

use crate::ConnectionId;

/// Implemented on objects that can run a `Future` in the background.
///
/// > **Note**: While it may be tempting to implement this trait on types such as
/// > [`futures::stream::FuturesUnordered`], please note that passing an `Executor` is
/// > optional, and that `FuturesUnordered` (or a similar struct) will automatically
/// > be used as fallback by libp2p. The `Executor` trait should therefore only be
/// > about running `Future`s on a separate task.
pub trait Executor {
    /// Run the given future in the background until it ends.
    #[track_caller]
    fn exec(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>);

    /// Run the task of the established connection `connection` to `peer` until it ends. The
    /// same as [`Executor::exec`] unless an executor wants to treat connections differently by
    /// their peer (kith: this method is an addition to libp2p-swarm 0.48.0, see `PATCHED.md`).
    #[track_caller]
    fn exec_established(
        &self,
        peer: PeerId,
        connection: ConnectionId,
        future: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) {
        let _ = (peer, connection);
        self.exec(future)
    }
}

impl<F: Fn(Pin<Box<dyn Future<Output = ()> + Send>>)> Executor for F {
    fn exec(&self, f: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self(f)
    }
}

impl Executor for ThreadPool {
    fn exec(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.spawn_ok(future)
    }
}

#[cfg(all(
    feature = "tokio",
    not(any(target_os = "emscripten", target_os = "wasi", target_os = "unknown"))
))]
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct TokioExecutor;
#[cfg(all(
    feature = "tokio",
    not(any(target_os = "emscripten", target_os = "wasi", target_os = "unknown"))
))]
impl Executor for TokioExecutor {
    fn exec(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(future);
    }
}

#[cfg(target_arch = "wasm32")]
#[derive(Default, Debug, Clone, Copy, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct WasmBindgenExecutor;
#[cfg(target_arch = "wasm32")]
impl Executor for WasmBindgenExecutor {
    fn exec(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        wasm_bindgen_futures::spawn_local(future)
    }
}
