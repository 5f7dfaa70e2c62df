//! Failure points for the fault tier: named places in the storage and timing code where a test
//! can make a node sleep (a slow disk), fail (an fsync error), or die on the spot (a crash at a
//! precise moment), and an offset for the node's clocks.
//!
//! Nothing is active unless the process was started with one of:
//! - `TROUPE_FAILPOINTS="name=action;name=action"`, fixed for the process's life;
//! - `TROUPE_FAILPOINTS_FILE=path`, a file in the same grammar that is reread whenever it
//!   changes (every 50 ms), so a fault runner can switch points on and off in a live node.
//!   A missing or empty file means no points from it.
//!
//! While nothing is active, [`hit`] is one relaxed atomic load.
//!
//! An action is `[P%][N*]kind`: `kind` fires with probability P (default 100) and at most N
//! times (default unbounded). Kinds:
//! - `off`: nothing;
//! - `sleep(MS)`: blocks the calling thread for MS milliseconds;
//! - `error`: the operation fails with an I/O error naming the point;
//! - `abort`: the process aborts at once, as if killed at that line.
//!
//! `clock.offset_ms=N` (N signed) shifts the node's wall clock by N ms ([`wall_now`]). Its
//! monotonic clock ([`monotonic_now`]) moves forward by the largest positive offset set so
//! far and never back, as a monotonic clock can jump (a VM paused and resumed) but not
//! reverse.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// The point that shifts the clocks.
pub const CLOCK_OFFSET: &str = "clock.offset_ms";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Off,
    Sleep(Duration),
    Error,
    Abort,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// Probability in [0, 1].
    pub probability: f64,
    /// Fires left; `None` is unbounded.
    pub remaining: Option<u64>,
    pub kind: Kind,
}

static ACTIVE: AtomicBool = AtomicBool::new(false);
static WALL_OFFSET_MS: AtomicI64 = AtomicI64::new(0);
static MONOTONIC_OFFSET_MS: AtomicU64 = AtomicU64::new(0);

#[derive(Default)]
struct Registry {
    /// From `TROUPE_FAILPOINTS`.
    fixed: Spec,
    /// From the file (or [`configure`]), replacing `fixed` where both set a point.
    points: Spec,
    rng: u64,
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        Mutex::new(Registry {
            rng: seed | 1,
            ..Registry::default()
        })
    })
}

/// A parsed set of points.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Spec {
    pub points: HashMap<String, Action>,
    /// `clock.offset_ms`, if set.
    pub clock_offset_ms: Option<i64>,
}

/// Parses `name=action;name=action` (newlines also separate; `#` starts a comment).
pub fn parse(spec: &str) -> Result<Spec, String> {
    let mut parsed = Spec::default();
    for item in spec.split([';', '\n']) {
        let item = item.split('#').next().unwrap_or("").trim();
        if item.is_empty() {
            continue;
        }
        let (name, action) = item
            .split_once('=')
            .ok_or_else(|| format!("failpoint {item:?} has no action: write name=action"))?;
        let (name, action) = (name.trim(), action.trim());
        if name.is_empty() {
            return Err(format!("failpoint {item:?} has no name"));
        }
        if name == CLOCK_OFFSET {
            let ms: i64 = action.parse().map_err(|_| {
                format!("{CLOCK_OFFSET}={action:?}: the offset is a signed number of milliseconds")
            })?;
            parsed.clock_offset_ms = Some(ms);
        } else {
            let action = parse_action(action).map_err(|e| format!("failpoint {name}: {e}"))?;
            parsed.points.insert(name.to_owned(), action);
        }
    }
    Ok(parsed)
}

fn parse_action(text: &str) -> Result<Action, String> {
    let mut rest = text;
    let mut probability = 1.0;
    if let Some((p, tail)) = rest.split_once('%') {
        let percent: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("{p:?} is not a percentage (write e.g. 5%abort)"))?;
        if !(0.0..=100.0).contains(&percent) {
            return Err(format!("{percent}% is not between 0 and 100"));
        }
        probability = percent / 100.0;
        rest = tail;
    }
    let mut remaining = None;
    if let Some((n, tail)) = rest.split_once('*') {
        remaining = Some(
            n.trim()
                .parse::<u64>()
                .map_err(|_| format!("{n:?} is not a count (write e.g. 1*abort to fire once)"))?,
        );
        rest = tail;
    }
    let rest = rest.trim();
    let kind = match rest {
        "off" => Kind::Off,
        "error" => Kind::Error,
        "abort" => Kind::Abort,
        _ => {
            let ms = rest
                .strip_prefix("sleep(")
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| {
                    format!("unknown action {rest:?}: use off, sleep(MS), error or abort")
                })?;
            let ms: u64 = ms
                .trim()
                .parse()
                .map_err(|_| format!("sleep({ms}): the time is whole milliseconds"))?;
            Kind::Sleep(Duration::from_millis(ms))
        }
    };
    Ok(Action {
        probability,
        remaining,
        kind,
    })
}

/// Replaces the points set from the file (or by a test) with `spec`.
pub fn configure(spec: &str) -> Result<(), String> {
    let points = parse(spec)?;
    let mut registry = registry().lock().unwrap_or_else(PoisonError::into_inner);
    registry.points = points;
    refresh(&registry);
    Ok(())
}

/// Recomputes the fast-path flag and the clock offsets.
fn refresh(registry: &Registry) {
    let offset = registry
        .points
        .clock_offset_ms
        .or(registry.fixed.clock_offset_ms)
        .unwrap_or(0);
    WALL_OFFSET_MS.store(offset, Ordering::Relaxed);
    if offset > 0 {
        MONOTONIC_OFFSET_MS.fetch_max(offset as u64, Ordering::Relaxed);
    }
    let any = registry
        .fixed
        .points
        .values()
        .chain(registry.points.points.values())
        .any(|action| action.kind != Kind::Off);
    ACTIVE.store(any, Ordering::Release);
}

/// Reads `TROUPE_FAILPOINTS` and starts following `TROUPE_FAILPOINTS_FILE`, if set. An
/// unreadable spec is an error naming the variable, so a node does not start with a fault
/// set other than the one asked for.
pub fn init_from_env() -> Result<(), String> {
    if let Ok(spec) = std::env::var("TROUPE_FAILPOINTS") {
        let fixed = parse(&spec).map_err(|e| format!("TROUPE_FAILPOINTS: {e}"))?;
        let mut registry = registry().lock().unwrap_or_else(PoisonError::into_inner);
        registry.fixed = fixed;
        refresh(&registry);
    }
    if let Some(path) = std::env::var_os("TROUPE_FAILPOINTS_FILE") {
        let path = std::path::PathBuf::from(path);
        let initial = read_file(&path)?;
        configure(&initial).map_err(|e| format!("{}: {e}", path.display()))?;
        std::thread::Builder::new()
            .name("failpoints".into())
            .spawn(move || follow(path, initial))
            .map_err(|e| format!("starting the failpoint file watcher: {e}"))?;
    }
    Ok(())
}

fn read_file(path: &std::path::Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(format!("TROUPE_FAILPOINTS_FILE {}: {e}", path.display())),
    }
}

/// Rereads the file every 50 ms and applies it when its text changed. A file that does not
/// parse is reported once and leaves the points as they were.
fn follow(path: std::path::PathBuf, mut seen: String) {
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let Ok(text) = read_file(&path) else { continue };
        if text == seen {
            continue;
        }
        if let Err(error) = configure(&text) {
            eprintln!(
                "failpoints: {}: {error}; the points stay as they were",
                path.display()
            );
        }
        seen = text;
    }
}

/// Whether any point is set (clock offsets aside).
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// Passes point `name`: sleeps, aborts or returns an error if it is set to.
pub fn hit(name: &str) -> std::io::Result<()> {
    match fire(name) {
        None | Some(Kind::Off) => Ok(()),
        Some(Kind::Sleep(pause)) => {
            std::thread::sleep(pause);
            Ok(())
        }
        Some(Kind::Error) => Err(injected(name)),
        Some(Kind::Abort) => abort(name),
    }
}

/// Decides whether point `name` fires now, and counts the firing, without acting on it: for
/// callers that must not block their thread, such as async code, which sleeps on its timer
/// instead. Act on the result with [`injected`] and [`abort`].
pub fn fire(name: &str) -> Option<Kind> {
    if !active() {
        return None;
    }
    let kind = {
        let mut guard = registry().lock().unwrap_or_else(PoisonError::into_inner);
        let registry = &mut *guard;
        let action = match registry.points.points.get_mut(name) {
            Some(action) => action,
            None => registry.fixed.points.get_mut(name)?,
        };
        if action.remaining == Some(0) || action.kind == Kind::Off {
            return None;
        }
        if action.probability < 1.0 {
            // xorshift64: good enough to decide a coin.
            let mut x = registry.rng;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            registry.rng = x;
            if (x >> 11) as f64 / (1u64 << 53) as f64 >= action.probability {
                return None;
            }
        }
        if let Some(left) = &mut action.remaining {
            *left -= 1;
        }
        action.kind
    };
    Some(kind)
}

/// The error an `error` action injects at point `name`.
pub fn injected(name: &str) -> std::io::Error {
    std::io::Error::other(format!("failpoint {name}: injected I/O error"))
}

/// What an `abort` action does at point `name`: the process dies on the spot.
pub fn abort(name: &str) -> ! {
    eprintln!("failpoint {name}: aborting the process");
    std::process::abort()
}

/// The wall clock, shifted by `clock.offset_ms`.
pub fn wall_now() -> SystemTime {
    let offset = WALL_OFFSET_MS.load(Ordering::Relaxed);
    let now = SystemTime::now();
    if offset >= 0 {
        now + Duration::from_millis(offset as u64)
    } else {
        now.checked_sub(Duration::from_millis(offset.unsigned_abs()))
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// A monotonic instant, jumped forward by the largest positive `clock.offset_ms` set so far.
pub fn monotonic_now() -> Instant {
    Instant::now() + Duration::from_millis(MONOTONIC_OFFSET_MS.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_and_bad_ones_say_why() {
        let spec = parse(
            "raft.log.flush=25%2*sleep(300); raft.vote.save=error\n# note\nclock.offset_ms=-5",
        )
        .unwrap();
        assert_eq!(spec.clock_offset_ms, Some(-5));
        let points = spec.points;
        assert_eq!(
            points["raft.log.flush"],
            Action {
                probability: 0.25,
                remaining: Some(2),
                kind: Kind::Sleep(Duration::from_millis(300))
            }
        );
        assert_eq!(points["raft.vote.save"].kind, Kind::Error);
        for (bad, says) in [
            ("x", "no action"),
            ("x=explode", "unknown action"),
            ("x=150%abort", "between 0 and 100"),
            ("x=sleep(fast)", "whole milliseconds"),
            ("clock.offset_ms=soon", "signed number"),
        ] {
            let error = parse(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    // One test touches the global registry, so that tests running in parallel do not race.
    #[test]
    fn points_fire_as_configured_and_the_clock_moves() {
        assert!(hit("t.error").is_ok());
        configure("t.error=2*error; t.never=0%error; t.off=off").unwrap();
        assert!(active());
        assert!(hit("t.error").is_err());
        assert!(hit("t.error").is_err());
        assert!(hit("t.error").is_ok(), "a count of 2 fires twice");
        for _ in 0..100 {
            assert!(hit("t.never").is_ok());
            assert!(hit("t.off").is_ok());
        }
        let before = monotonic_now();
        let wall = SystemTime::now();
        configure("clock.offset_ms=60000").unwrap();
        assert!(!active(), "a clock offset alone sets no point");
        assert!(wall_now() >= wall + Duration::from_secs(59));
        assert!(monotonic_now() >= before + Duration::from_secs(59));
        configure("clock.offset_ms=-60000").unwrap();
        assert!(wall_now() <= wall, "the wall clock goes back");
        assert!(
            monotonic_now() >= before + Duration::from_secs(59),
            "the monotonic clock never goes back"
        );
        configure("").unwrap();
        assert!(!active());
    }
}
