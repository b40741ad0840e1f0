//! Two queues into one service: requests from the relay's users, and requests from newcomers'
//! connections ([`crate::lanes`]), which the service takes only when no other request waits.

use std::task::Poll;

use tokio::sync::mpsc;

/// The sending ends, cheap to clone.
#[derive(Debug)]
pub struct Senders<T> {
    users: mpsc::Sender<T>,
    newcomers: mpsc::Sender<T>,
}

impl<T> Clone for Senders<T> {
    fn clone(&self) -> Self {
        Self {
            users: self.users.clone(),
            newcomers: self.newcomers.clone(),
        }
    }
}

impl<T> Senders<T> {
    /// The queue for a request from a newcomer's connection (`newcomer`) or a user's.
    pub fn to(&self, newcomer: bool) -> &mpsc::Sender<T> {
        if newcomer {
            &self.newcomers
        } else {
            &self.users
        }
    }

    /// The users' queue, for what is not a peer's request (the relay's own commands).
    pub fn users(&self) -> &mpsc::Sender<T> {
        &self.users
    }
}

/// The receiving ends.
#[derive(Debug)]
pub struct Receivers<T> {
    users: mpsc::Receiver<T>,
    newcomers: mpsc::Receiver<T>,
}

impl<T> Receivers<T> {
    /// Waits for the next requests into `buf`: up to `most` of the users', or when none waits,
    /// up to `newcomers_most` of the newcomers' (a user's request that arrives meanwhile waits
    /// for that many at most). 0 once every sender is gone and both queues are drained.
    pub async fn recv_many(
        &mut self,
        buf: &mut Vec<T>,
        most: usize,
        newcomers_most: usize,
    ) -> usize {
        std::future::poll_fn(|cx| match self.users.poll_recv_many(cx, buf, most) {
            Poll::Ready(n) if n > 0 => Poll::Ready(n),
            // Empty, or closed: the newcomers' queue is drained before the end too.
            users => match self.newcomers.poll_recv_many(cx, buf, newcomers_most) {
                Poll::Ready(0) if users.is_pending() => Poll::Pending,
                newcomers => newcomers,
            },
        })
        .await
    }
}

/// Two queues with room for `capacity` each.
pub fn queues<T>(capacity: usize) -> (Senders<T>, Receivers<T>) {
    let (users, users_rx) = mpsc::channel(capacity);
    let (newcomers, newcomers_rx) = mpsc::channel(capacity);
    (
        Senders { users, newcomers },
        Receivers {
            users: users_rx,
            newcomers: newcomers_rx,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn newcomers_wait_for_users_in_small_batches_and_are_drained_at_the_end() {
        let (senders, mut receivers) = queues::<u32>(100);
        for i in 0..40 {
            senders.to(true).try_send(100 + i).expect("room");
        }
        senders.to(false).try_send(1).expect("room");
        senders.users().try_send(2).expect("room");
        let mut buf = Vec::new();
        assert_eq!(receivers.recv_many(&mut buf, 64, 32).await, 2);
        assert_eq!(buf, [1, 2], "the users' first");
        buf.clear();
        assert_eq!(receivers.recv_many(&mut buf, 64, 32).await, 32);
        buf.clear();
        // A user's request that arrives between newcomers' batches goes first again.
        senders.to(false).try_send(3).expect("room");
        assert_eq!(receivers.recv_many(&mut buf, 64, 32).await, 1);
        assert_eq!(buf, [3]);
        buf.clear();
        drop(senders);
        assert_eq!(
            receivers.recv_many(&mut buf, 64, 32).await,
            8,
            "drained after the senders go"
        );
        buf.clear();
        assert_eq!(receivers.recv_many(&mut buf, 64, 32).await, 0);
    }
}
