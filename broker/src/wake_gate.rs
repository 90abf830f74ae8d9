//! A gate for the futures of one task that rarely make progress: each is polled again only
//! after something woke it, not every time the task runs.
//!
//! `tokio::select!` polls every pending branch each time its task wakes. A runner
//! connection's task wakes several times per job (its inbox, each job's stream), and most
//! of its branches wait on things that happen once a minute or once a connection: a
//! control frame from the runner (a read of quinn's stream state, under the connection's
//! lock), a message from the actor, the connection's close. Behind a gate those cost
//! nothing until they are woken.
//!
//! One gate serves up to 8 futures: each has a bit, the gate's waker sets them all and
//! wakes the task, and a future is polled when its bit is set. One allocation per gate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

/// See the module's documentation.
#[derive(Debug, Clone)]
pub(crate) struct WakeGate {
    inner: Arc<Inner>,
    waker: Waker,
}

#[derive(Debug)]
struct Inner {
    /// Futures to poll at their next turn: every bit is set at first and by each wake.
    due: AtomicU8,
    /// The task that polls the gated futures.
    task: AtomicWaker,
}

impl Wake for Inner {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.due.store(u8::MAX, Ordering::Release);
        self.task.wake();
    }
}

impl WakeGate {
    /// A gate whose futures are all due at first.
    pub(crate) fn new() -> Self {
        let inner = Arc::new(Inner { due: AtomicU8::new(u8::MAX), task: AtomicWaker::new() });
        let waker = Waker::from(inner.clone());
        Self { inner, waker }
    }

    /// Makes every future due at its next turn without waking the task: for a task that
    /// gave one of them work itself, and polls again before it sleeps.
    pub(crate) fn set_due(&self) {
        self.inner.due.store(u8::MAX, Ordering::Release);
    }

    /// Polls `poll` (future `slot`, 0..8) with the gate's waker if it is due; else
    /// `Pending` (the task is woken when it is due). A future that answered `Ready` stays
    /// due: a stream may have its next item at once.
    pub(crate) fn poll<T>(
        &self,
        slot: u8,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        debug_assert!(slot < 8);
        let bit = 1u8 << slot;
        self.inner.task.register(cx.waker());
        if self.inner.due.fetch_and(!bit, Ordering::AcqRel) & bit == 0 {
            return Poll::Pending;
        }
        let answer = poll(&mut Context::from_waker(&self.waker));
        if answer.is_ready() {
            self.inner.due.fetch_or(bit, Ordering::AcqRel);
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A future that counts its polls and answers once `ready` is set, waking whoever
    /// polled it last when that happens.
    #[derive(Default)]
    struct Probe {
        polls: AtomicUsize,
        ready: std::sync::atomic::AtomicBool,
        waker: AtomicWaker,
    }

    impl Probe {
        fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            self.waker.register(cx.waker());
            if self.ready.load(Ordering::SeqCst) { Poll::Ready(()) } else { Poll::Pending }
        }

        fn fire(&self) {
            self.ready.store(true, Ordering::SeqCst);
            self.waker.wake();
        }
    }

    #[derive(Default)]
    struct CountWakes(AtomicUsize);

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_gated_future_is_polled_again_only_after_its_wake() {
        let gate = WakeGate::new();
        let (a, b) = (Probe::default(), Probe::default());
        let task = Arc::new(CountWakes::default());
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        // Both are due at first.
        assert!(gate.poll(0, &mut cx, |c| a.poll(c)).is_pending());
        assert!(gate.poll(1, &mut cx, |c| b.poll(c)).is_pending());
        // The task runs again (for something else): neither is polled.
        for _ in 0..5 {
            assert!(gate.poll(0, &mut cx, |c| a.poll(c)).is_pending());
            assert!(gate.poll(1, &mut cx, |c| b.poll(c)).is_pending());
        }
        assert_eq!(a.polls.load(Ordering::SeqCst), 1);
        assert_eq!(b.polls.load(Ordering::SeqCst), 1);
        // b fires: the task is woken, and both are due (they share the gate's waker).
        b.fire();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(gate.poll(0, &mut cx, |c| a.poll(c)).is_pending());
        assert!(gate.poll(1, &mut cx, |c| b.poll(c)).is_ready());
        assert_eq!(a.polls.load(Ordering::SeqCst), 2);
        // A future that was ready stays due (a stream's next item may be there already).
        assert!(gate.poll(1, &mut cx, |c| b.poll(c)).is_ready());
        assert_eq!(b.polls.load(Ordering::SeqCst), 3);
        assert!(gate.poll(0, &mut cx, |c| a.poll(c)).is_pending());
        assert_eq!(a.polls.load(Ordering::SeqCst), 2);
    }
}
