//! A shutdown signal: a watch channel that flips to `true` once and wakes every task holding it.

use tokio::sync::watch;

/// The sending side: [`Trigger::fire`] stops everything holding a [`Signal`].
#[derive(Debug, Clone)]
pub struct Trigger(watch::Sender<bool>);

/// The receiving side.
#[derive(Debug, Clone)]
pub struct Signal(watch::Receiver<bool>);

/// A new trigger and its signal.
pub fn channel() -> (Trigger, Signal) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Signal(rx))
}

impl Trigger {
    /// Asks every holder of a signal to stop.
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Signal {
    /// Resolves once the trigger fired (or was dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}
