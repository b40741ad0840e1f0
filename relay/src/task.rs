//! Owned tasks: a spawned task whose handle aborts it when dropped, so no task outlives the
//! [`crate::Running`] relay that started it.

use tokio::task::{JoinError, JoinHandle};

/// A spawned task, aborted when this handle is dropped.
#[derive(Debug)]
pub struct Owned<T>(JoinHandle<T>);

impl<T: Send + 'static> Owned<T> {
    /// Spawns `future` on the current runtime.
    pub fn spawn(future: impl std::future::Future<Output = T> + Send + 'static) -> Self {
        Self(tokio::spawn(future))
    }
}

impl<T> Owned<T> {
    /// Waits for the task to end (aborting it if this future is dropped first).
    pub async fn join(mut self) -> Result<T, JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
