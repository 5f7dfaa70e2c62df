//! Fault injection for tests, compiled in only with the `failpoints` feature; without it
//! every hook is an empty inline function.
//!
//! - [`panic_next_batches`]: the next N batches panic inside the worker thread, as a bug in
//!   the model code would.
//! - [`hold_batches`]: workers block before computing until the returned guard is dropped,
//!   so tests can fill queues and let deadlines pass deterministically.

#[cfg(feature = "failpoints")]
mod enabled {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex};

    static PANICS: AtomicUsize = AtomicUsize::new(0);
    static HOLD: Mutex<bool> = Mutex::new(false);
    static RELEASED: Condvar = Condvar::new();

    pub fn panic_next_batches(count: usize) {
        PANICS.store(count, Ordering::SeqCst);
    }

    /// Blocks workers at the start of their next batches until the guard is dropped.
    pub fn hold_batches() -> HoldGuard {
        *HOLD.lock().unwrap_or_else(|p| p.into_inner()) = true;
        HoldGuard(())
    }

    pub struct HoldGuard(());

    impl Drop for HoldGuard {
        fn drop(&mut self) {
            *HOLD.lock().unwrap_or_else(|p| p.into_inner()) = false;
            RELEASED.notify_all();
        }
    }

    pub(crate) fn before_batch() {
        let mut held = HOLD.lock().unwrap_or_else(|p| p.into_inner());
        while *held {
            held = RELEASED.wait(held).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub(crate) fn during_batch() {
        let armed = PANICS
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if armed {
            panic!("failpoint: injected worker panic");
        }
    }
}

#[cfg(feature = "failpoints")]
pub use enabled::{hold_batches, panic_next_batches, HoldGuard};
#[cfg(feature = "failpoints")]
pub(crate) use enabled::{before_batch, during_batch};

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn before_batch() {}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn during_batch() {}
