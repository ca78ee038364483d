//! The global event stream position and the notifier that wakes waiting `/sync` requests.
//!
//! Positions are assigned under one lock that is held until the event is committed, so the stream
//! is gap-free and a position is announced only once everything below it is stored.

use tokio::sync::{Mutex, MutexGuard, watch};

pub struct EventStream {
    last: Mutex<i64>,
    notify: watch::Sender<i64>,
    closing: watch::Sender<bool>,
}

impl EventStream {
    pub fn new(last: i64) -> Self {
        let (notify, _) = watch::channel(last);
        Self {
            last: Mutex::new(last),
            notify,
            closing: watch::Sender::new(false),
        }
    }

    /// Tells long-polling readers to answer now: the server is shutting down.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`EventStream::close`] was called.
    pub async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        let _ = rx.wait_for(|closing| *closing).await;
    }

    /// Reserves the next position. Drop the guard without calling [`StreamSlot::commit`] and the
    /// position is not used.
    pub async fn next_slot(&self) -> StreamSlot<'_> {
        self.next_slots(1).await
    }

    /// Reserves `count` consecutive positions, starting at [`StreamSlot::pos`].
    pub async fn next_slots(&self, count: i64) -> StreamSlot<'_> {
        let guard = self.last.lock().await;
        StreamSlot {
            pos: *guard + 1,
            count,
            guard,
            stream: self,
        }
    }

    /// The newest committed position.
    pub fn current(&self) -> i64 {
        *self.notify.borrow()
    }

    /// A receiver that changes whenever a new event is committed.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.notify.subscribe()
    }
}

pub struct StreamSlot<'a> {
    /// The first reserved position.
    pub pos: i64,
    count: i64,
    guard: MutexGuard<'a, i64>,
    stream: &'a EventStream,
}

impl StreamSlot<'_> {
    /// Marks the position as used (its event is stored) and wakes everyone waiting.
    pub fn commit(mut self) {
        let last = self.pos + self.count - 1;
        *self.guard = last;
        self.stream.notify.send_replace(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn abandoned_slot_leaves_no_gap() {
        let stream = EventStream::new(5);
        let slot = stream.next_slot().await;
        assert_eq!(slot.pos, 6);
        drop(slot);
        let slot = stream.next_slot().await;
        assert_eq!(slot.pos, 6, "an unused position is handed out again");
        let mut rx = stream.subscribe();
        slot.commit();
        assert!(rx.has_changed().expect("open"));
        assert_eq!(*rx.borrow_and_update(), 6);
        assert_eq!(stream.next_slot().await.pos, 7);
    }
}
