//! A fork-join pool for the encoder's small parallel steps, whose helper threads spin
//! between steps instead of sleeping.
//!
//! A forward pass is a chain of short parallel steps: at batch 1 × 16 tokens, about 50 of
//! them in 2–3 ms. With rayon, a worker that finds no work yields and then sleeps on a
//! futex within microseconds, so nearly every step paid a wake-up (`perf`: a fifth of a
//! batch-1 pass in `sched_yield` and futex calls). Here a helper that finishes a step spins
//! for [`SPIN`] and then parks: the gaps between the steps of a forward pass are shorter, so
//! inside one it is always awake, and between requests it gives its core back to the node's
//! network threads at once. (Yielding the core for 2 ms instead of parking made a serving
//! node 3x slower at 1 client: a yielding thread stays runnable and took the core from the
//! threads that answer the request and receive the next.)
//!
//! One job runs at a time. A caller that finds the pool busy (another worker thread's
//! forward pass) runs its tasks itself, in order, rather than wait.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a helper spins on the job word after its last task.
const SPIN: Duration = Duration::from_micros(50);

/// A job's tasks, type-erased: called with each task index once.
type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Odd while a job is open, even while none is; bumped to open and to close each job.
    generation: AtomicU64,
    /// The open job. Written only by the caller holding `busy`, while the generation is
    /// even and no helper is `inside`.
    job: UnsafeCell<Option<Task<'static>>>,
    tasks: AtomicUsize,
    /// The next task index to hand out.
    next: AtomicUsize,
    /// Tasks of the open job not yet finished.
    unfinished: AtomicUsize,
    /// Helpers between reading the job and handing back their last claim.
    inside: AtomicUsize,
    /// Whether a caller holds the pool.
    busy: AtomicBool,
    /// Helpers parked on `wake`.
    parked: AtomicUsize,
    /// The first panic of the open job's tasks, for the caller to re-raise.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only while no helper can read it (see `Pool::run`), and read only
// by helpers counted in `inside` while the generation says the job is open.
unsafe impl Sync for Shared {}

/// The process's encoder pool: the caller plus `threads - 1` helper threads.
pub struct Pool {
    shared: &'static Shared,
    threads: usize,
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// The pool, created on first use with as many threads as rayon's global pool (which
/// `serving.compute_threads` and `--threads` size).
pub fn global() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(rayon::current_num_threads().max(1)))
}

/// Runs `task(i)` for every `i` in `0..tasks` on the global pool and returns when all have
/// finished.
pub fn run(tasks: usize, task: impl Fn(usize) + Sync) {
    global().run(tasks, &task);
}

impl Pool {
    fn new(threads: usize) -> Self {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            generation: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            unfinished: AtomicUsize::new(0),
            inside: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            panic: Mutex::new(None),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let mut helpers = 0;
        for index in 1..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("troupe-encoder-{index}"))
                .spawn(move || helper(shared));
            if spawned.is_ok() {
                helpers += 1;
            } else {
                tracing::warn!("cannot start encoder helper thread {index}; running with fewer");
            }
        }
        Self {
            shared,
            threads: helpers + 1,
        }
    }

    /// Threads that take part in a job, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `task(i)` for every `i` in `0..tasks`, returning when all have finished.
    ///
    /// A panic in a task is re-raised here once every task has finished.
    pub fn run(&self, tasks: usize, task: Task<'_>) {
        let shared = self.shared;
        if tasks <= 1 || self.threads == 1 || shared.busy.swap(true, SeqCst) {
            (0..tasks).for_each(task);
            return;
        }
        // SAFETY: only the holder of `busy` writes the job, and no helper reads it: the
        // generation is even (the last job was closed) and `inside` drained before that
        // job's caller released `busy`. The lifetime is extended for the helpers' sake; they
        // stop using it before this call returns (the job is closed and `inside` drained).
        unsafe {
            *shared.job.get() = Some(std::mem::transmute::<Task<'_>, Task<'static>>(task));
        }
        shared.tasks.store(tasks, SeqCst);
        shared.next.store(0, SeqCst);
        shared.unfinished.store(tasks, SeqCst);
        shared.generation.fetch_add(1, SeqCst); // open: odd
        if shared.parked.load(SeqCst) > 0 {
            let _guard = lock(&shared.lock);
            shared.wake.notify_all();
        }
        work(shared, task);
        let mut spins = 0u32;
        while shared.unfinished.load(SeqCst) > 0 {
            backoff(&mut spins);
        }
        shared.generation.fetch_add(1, SeqCst); // closed: even
        while shared.inside.load(SeqCst) > 0 {
            backoff(&mut spins);
        }
        // SAFETY: as above; no helper is inside and none can enter a closed job.
        unsafe {
            *shared.job.get() = None;
        }
        let panic = lock(&shared.panic).take();
        shared.busy.store(false, SeqCst);
        if let Some(panic) = panic {
            std::panic::resume_unwind(panic);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Claims and runs tasks of the open job until none are left. A panicking task counts as
/// finished (so the caller is never left waiting) and its panic is kept for the caller.
fn work(shared: &Shared, task: Task<'_>) {
    let tasks = shared.tasks.load(SeqCst);
    loop {
        let index = shared.next.fetch_add(1, SeqCst);
        if index >= tasks {
            return;
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task(index)));
        if let Err(panic) = outcome {
            lock(&shared.panic).get_or_insert(panic);
        }
        shared.unfinished.fetch_sub(1, SeqCst);
    }
}

/// Spins, then yields the core, so a waiter never starves the thread it waits for.
fn backoff(spins: &mut u32) {
    if *spins < 256 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
    *spins = spins.saturating_add(1);
}

fn helper(shared: &'static Shared) {
    let mut seen = shared.generation.load(SeqCst);
    loop {
        let generation = wait_for_job(shared, seen);
        seen = generation;
        shared.inside.fetch_add(1, SeqCst);
        // Re-check after announcing ourselves: a caller closes the job and then waits for
        // `inside` to drain, so either it sees us, or we see the job closed.
        if shared.generation.load(SeqCst) == generation {
            // SAFETY: the job is open and we are counted in `inside`, so the caller has not
            // returned and the job it wrote stays valid until we leave.
            if let Some(task) = unsafe { *shared.job.get() } {
                work(shared, task);
            }
        }
        shared.inside.fetch_sub(1, SeqCst);
    }
}

/// Waits until the generation is odd and differs from `seen`, and returns it: spins for
/// [`SPIN`], then parks.
fn wait_for_job(shared: &Shared, seen: u64) -> u64 {
    let open = |generation: u64| generation != seen && !generation.is_multiple_of(2);
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        let generation = shared.generation.load(SeqCst);
        if open(generation) {
            return generation;
        }
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(64) && start.elapsed() >= SPIN {
            break;
        }
        std::hint::spin_loop();
    }
    let mut guard = lock(&shared.lock);
    shared.parked.fetch_add(1, SeqCst);
    loop {
        let generation = shared.generation.load(SeqCst);
        if open(generation) {
            shared.parked.fetch_sub(1, SeqCst);
            return generation;
        }
        guard = shared
            .wake
            .wait(guard)
            .unwrap_or_else(|poison| poison.into_inner());
    }
}

/// A mutable slice that pool tasks write in disjoint ranges.
pub struct SharedSlice<'a> {
    start: *mut f32,
    len: usize,
    _slice: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: tasks take disjoint ranges (the caller of `range` promises it).
unsafe impl Send for SharedSlice<'_> {}
unsafe impl Sync for SharedSlice<'_> {}

impl<'a> SharedSlice<'a> {
    pub fn new(slice: &'a mut [f32]) -> Self {
        Self {
            start: slice.as_mut_ptr(),
            len: slice.len(),
            _slice: std::marker::PhantomData,
        }
    }

    /// A pointer to element `offset`, for a writer (such as a strided GEMM) that takes one.
    ///
    /// # Panics
    /// If `offset` is past the end of the slice.
    pub fn ptr_at(&self, offset: usize) -> *mut f32 {
        assert!(offset <= self.len, "offset outside the slice");
        self.start.wrapping_add(offset)
    }

    /// The elements in `range`.
    ///
    /// # Safety
    /// No two live results may overlap.
    ///
    /// # Panics
    /// If `range` is not inside the slice.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, range: std::ops::Range<usize>) -> &'a mut [f32] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "range outside the slice"
        );
        // SAFETY: inside the slice (asserted); disjoint from every other live range (the
        // caller's promise).
        unsafe { std::slice::from_raw_parts_mut(self.start.add(range.start), range.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once() {
        let pool = Pool::new(3);
        for tasks in [0, 1, 2, 5, 64, 1000] {
            let counts: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
            pool.run(tasks, &|index| {
                counts[index].fetch_add(1, SeqCst);
            });
            assert!(
                counts.iter().all(|count| count.load(SeqCst) == 1),
                "{tasks} tasks"
            );
        }
    }

    #[test]
    fn jobs_from_several_threads_all_complete() {
        let pool = Pool::new(2);
        let total = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..200 {
                        pool.run(7, &|index| {
                            total.fetch_add(index + 1, SeqCst);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(SeqCst), 4 * 200 * 28);
    }

    #[test]
    fn helpers_wake_after_parking() {
        let pool = Pool::new(2);
        let done = AtomicUsize::new(0);
        pool.run(4, &|_| {
            done.fetch_add(1, SeqCst);
        });
        // Once the helper has parked, the next job must still wake it and run every task.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.shared.parked.load(SeqCst) < pool.threads() - 1 {
            assert!(Instant::now() < deadline, "the idle helper never parked");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Each task waits for the other to start, so both finish only if the helper woke.
        let started = AtomicUsize::new(0);
        pool.run(2, &|_| {
            started.fetch_add(1, SeqCst);
            let deadline = Instant::now() + Duration::from_secs(10);
            while started.load(SeqCst) < 2 {
                assert!(Instant::now() < deadline, "the parked helper never woke");
                std::hint::spin_loop();
            }
            done.fetch_add(1, SeqCst);
        });
        assert_eq!(done.load(SeqCst), 6);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_lives_on() {
        let pool = Pool::new(2);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(8, &|index| assert_ne!(index, 5, "task 5 fails"));
        }));
        assert!(result.is_err());
        let done = AtomicUsize::new(0);
        pool.run(8, &|_| {
            done.fetch_add(1, SeqCst);
        });
        assert_eq!(done.load(SeqCst), 8);
    }
}
