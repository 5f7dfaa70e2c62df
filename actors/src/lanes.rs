//! Bounded priority lanes: the queue a batcher flushes from.
//!
//! Each lane is a FIFO with its own capacity. A push into a full lane fails at once, so the
//! caller can answer `RESOURCE_EXHAUSTED` and route elsewhere instead of waiting. A batch
//! takes from the highest-priority lane first. Entries whose deadline has passed are
//! removed before a batch is formed, so no compute is spent on them.

use std::collections::VecDeque;
use std::time::Instant;

/// A push into a full lane.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lane {lane} is full ({capacity} queued): retry later or on another node")]
pub struct LaneFull {
    pub lane: usize,
    pub capacity: usize,
}

#[derive(Debug)]
struct Entry<T> {
    item: T,
    enqueued: Instant,
    deadline: Option<Instant>,
}

/// `lanes[0]` is the highest priority.
#[derive(Debug)]
pub struct Lanes<T> {
    lanes: Vec<VecDeque<Entry<T>>>,
    capacity: usize,
}

impl<T> Lanes<T> {
    /// `count` lanes of `capacity` entries each (both at least 1).
    pub fn new(count: usize, capacity: usize) -> Self {
        Self {
            lanes: (0..count.max(1)).map(|_| VecDeque::new()).collect(),
            capacity: capacity.max(1),
        }
    }

    pub fn lane_count(&self) -> usize {
        self.lanes.len()
    }

    /// Queues `item` on `lane` (clamped to the lowest lane).
    pub fn push(
        &mut self,
        lane: usize,
        item: T,
        now: Instant,
        deadline: Option<Instant>,
    ) -> Result<(), (LaneFull, T)> {
        let lane = lane.min(self.lanes.len() - 1);
        let queue = &mut self.lanes[lane];
        if queue.len() >= self.capacity {
            return Err((
                LaneFull {
                    lane,
                    capacity: self.capacity,
                },
                item,
            ));
        }
        queue.push_back(Entry {
            item,
            enqueued: now,
            deadline,
        });
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.lanes.iter().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(VecDeque::is_empty)
    }

    /// Depth of each lane, highest priority first.
    pub fn depths(&self) -> Vec<usize> {
        self.lanes.iter().map(VecDeque::len).collect()
    }

    /// When the oldest queued entry arrived: the batcher flushes `max_queue_delay` after it.
    pub fn oldest_enqueued(&self) -> Option<Instant> {
        self.lanes
            .iter()
            .filter_map(|q| q.front().map(|e| e.enqueued))
            .min()
    }

    /// Removes and returns every entry whose deadline is at or before `now`.
    pub fn take_expired(&mut self, now: Instant) -> Vec<T> {
        self.take_where(|_, deadline| deadline.is_some_and(|d| d <= now))
    }

    /// Removes and returns every entry `remove(item, deadline)` picks, keeping the order of
    /// the rest. A lane with nothing to remove is left as it is: the batcher runs this on
    /// every message. `remove` must give the same answer when asked twice.
    pub fn take_where(&mut self, mut remove: impl FnMut(&T, Option<Instant>) -> bool) -> Vec<T> {
        let mut taken = Vec::new();
        for queue in &mut self.lanes {
            if !queue
                .iter()
                .any(|entry| remove(&entry.item, entry.deadline))
            {
                continue;
            }
            let mut kept = VecDeque::with_capacity(queue.len());
            for entry in queue.drain(..) {
                if remove(&entry.item, entry.deadline) {
                    taken.push(entry.item);
                } else {
                    kept.push_back(entry);
                }
            }
            *queue = kept;
        }
        taken
    }

    /// The lane and item that would be taken next.
    pub fn peek(&self) -> Option<(usize, &T)> {
        self.lanes
            .iter()
            .enumerate()
            .find_map(|(lane, queue)| queue.front().map(|entry| (lane, &entry.item)))
    }

    /// Puts `item` back at the head of `lane`, past the capacity: it had been admitted
    /// before (a preempted sequence) and must not be refused now.
    pub fn push_front(
        &mut self,
        lane: usize,
        item: T,
        enqueued: Instant,
        deadline: Option<Instant>,
    ) {
        let lane = lane.min(self.lanes.len() - 1);
        self.lanes[lane].push_front(Entry {
            item,
            enqueued,
            deadline,
        });
    }

    /// Up to `max` entries, highest-priority lane first, FIFO within a lane.
    pub fn take_batch(&mut self, max: usize) -> Vec<T> {
        let mut batch = Vec::with_capacity(max.min(self.len()));
        for queue in &mut self.lanes {
            while batch.len() < max {
                match queue.pop_front() {
                    Some(entry) => batch.push(entry.item),
                    None => break,
                }
            }
        }
        batch
    }
}

/// Items with a size: a batch is bounded by the sum of its items' weights (texts, for the
/// batcher), not by their count.
pub trait Weighted {
    fn weight(&self) -> usize;
}

impl<T: Weighted> Lanes<T> {
    /// Sum of the queued items' weights.
    pub fn total_weight(&self) -> usize {
        self.lanes
            .iter()
            .flat_map(|q| q.iter())
            .map(|e| e.item.weight())
            .sum()
    }

    /// Items, highest-priority lane first and FIFO within a lane, while their weights fit in
    /// `max`. The first item is always taken, however heavy, so nothing waits forever.
    pub fn take_batch_weighted(&mut self, max: usize) -> Vec<T> {
        let mut batch = Vec::new();
        let mut weight = 0usize;
        for queue in &mut self.lanes {
            while let Some(front) = queue.front() {
                let next = front.item.weight();
                if !batch.is_empty() && weight.saturating_add(next) > max {
                    return batch;
                }
                weight = weight.saturating_add(next);
                if let Some(entry) = queue.pop_front() {
                    batch.push(entry.item);
                }
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn batches_drain_high_priority_lanes_first_in_fifo_order() {
        let now = Instant::now();
        let mut lanes = Lanes::new(3, 10);
        for (lane, item) in [
            (2, "low-1"),
            (0, "high-1"),
            (1, "mid-1"),
            (0, "high-2"),
            (2, "low-2"),
        ] {
            lanes.push(lane, item, now, None).unwrap();
        }
        assert_eq!(lanes.take_batch(3), ["high-1", "high-2", "mid-1"]);
        assert_eq!(lanes.take_batch(10), ["low-1", "low-2"]);
        assert!(lanes.is_empty());
    }

    #[test]
    fn a_full_lane_refuses_at_once_and_returns_the_item() {
        let now = Instant::now();
        let mut lanes = Lanes::new(2, 2);
        lanes.push(0, 1, now, None).unwrap();
        lanes.push(0, 2, now, None).unwrap();
        let (full, item) = lanes.push(0, 3, now, None).unwrap_err();
        assert_eq!((full.lane, full.capacity, item), (0, 2, 3));
        // Other lanes are independent.
        lanes.push(1, 4, now, None).unwrap();
        assert_eq!(lanes.depths(), [2, 1]);
    }

    #[test]
    fn expired_entries_are_removed_before_batching() {
        let now = Instant::now();
        let mut lanes = Lanes::new(1, 10);
        lanes
            .push(0, "late", now, Some(now + Duration::from_millis(5)))
            .unwrap();
        lanes
            .push(0, "fine", now, Some(now + Duration::from_secs(60)))
            .unwrap();
        lanes.push(0, "none", now, None).unwrap();
        assert_eq!(
            lanes.take_expired(now + Duration::from_millis(10)),
            ["late"]
        );
        assert_eq!(lanes.take_batch(10), ["fine", "none"]);
    }

    impl Weighted for (char, usize) {
        fn weight(&self) -> usize {
            self.1
        }
    }

    #[test]
    fn weighted_batches_stop_before_the_limit_but_take_one_heavy_item() {
        let now = Instant::now();
        let mut lanes = Lanes::new(2, 10);
        for (lane, item) in [(1, ('a', 3)), (0, ('b', 2)), (0, ('c', 2)), (1, ('d', 1))] {
            lanes.push(lane, item, now, None).unwrap();
        }
        assert_eq!(lanes.total_weight(), 8);
        assert_eq!(lanes.take_batch_weighted(5), [('b', 2), ('c', 2)]);
        assert_eq!(lanes.take_batch_weighted(2), [('a', 3)]);
        assert_eq!(lanes.take_batch_weighted(usize::MAX), [('d', 1)]);
    }

    #[test]
    fn oldest_enqueued_tracks_the_front_of_every_lane() {
        let start = Instant::now();
        let mut lanes = Lanes::new(2, 4);
        assert_eq!(lanes.oldest_enqueued(), None);
        lanes.push(1, 'a', start, None).unwrap();
        lanes
            .push(0, 'b', start + Duration::from_millis(3), None)
            .unwrap();
        assert_eq!(lanes.oldest_enqueued(), Some(start));
        lanes.take_batch(1);
        assert_eq!(lanes.oldest_enqueued(), Some(start));
    }
}
