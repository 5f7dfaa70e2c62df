//! Fault injection for tests, compiled in only with the `failpoints` feature; without it
//! every hook is an empty inline function.
//!
//! - [`panic_next_batches`]: the next N batches panic inside the worker thread (or the next
//!   N decoder steps inside a scheduler's step loop), as a bug in the model code would.
//! - [`hold_batches`]: workers block before computing until the returned guard is dropped,
//!   so tests can fill queues and let deadlines pass deterministically.
//! - [`set_batch_delay`]: every batch takes at least this long, as a slow model would, so
//!   tests can create contention with the tiny model.

#[cfg(feature = "failpoints")]
mod enabled {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex};

    static PANICS: AtomicUsize = AtomicUsize::new(0);
    static DELAY_MICROS: AtomicUsize = AtomicUsize::new(0);
    static HOLD: Mutex<bool> = Mutex::new(false);
    static RELEASED: Condvar = Condvar::new();

    pub fn panic_next_batches(count: usize) {
        PANICS.store(count, Ordering::SeqCst);
    }

    pub fn set_batch_delay(delay: std::time::Duration) {
        DELAY_MICROS.store(delay.as_micros() as usize, Ordering::SeqCst);
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
        drop(held);
        let delay = DELAY_MICROS.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_micros(delay as u64));
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
pub(crate) use enabled::{before_batch, during_batch};
#[cfg(feature = "failpoints")]
pub use enabled::{hold_batches, panic_next_batches, set_batch_delay, HoldGuard};

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn before_batch() {}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn during_batch() {}
