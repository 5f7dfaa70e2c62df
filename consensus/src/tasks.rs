//! Task priorities and their scheduling order.
//!
//! A request names a task; the task's priority picks its batcher lane. The order is
//! `(priority desc, mod_revision asc, name asc)`: total (names are unique keys), and
//! computed only from replicated state, so every node schedules identically.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// A task as the metadata store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskPriority {
    pub name: String,
    pub priority: i32,
    /// Revision of the write that last set this priority.
    pub mod_revision: u64,
}

impl Ord for TaskPriority {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .priority
            .cmp(&self.priority)
            .then(self.mod_revision.cmp(&other.mod_revision))
            .then_with(|| self.name.cmp(&other.name))
    }
}

impl PartialOrd for TaskPriority {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Sorts tasks into scheduling order: the first is served first.
pub fn scheduling_order(mut tasks: Vec<TaskPriority>) -> Vec<TaskPriority> {
    tasks.sort();
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str, priority: i32, mod_revision: u64) -> TaskPriority {
        TaskPriority {
            name: name.into(),
            priority,
            mod_revision,
        }
    }

    #[test]
    fn higher_priority_first_then_older_write_then_name() {
        let tasks = vec![
            task("batch", 1, 5),
            task("search", 10, 9),
            task("chat", 10, 3),
            task("alpha", 1, 5),
            task("low", -4, 1),
        ];
        let names: Vec<String> = scheduling_order(tasks)
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["chat", "search", "alpha", "batch", "low"]);
    }

    #[test]
    fn the_order_does_not_depend_on_arrival_order() {
        let tasks = vec![
            task("a", 3, 2),
            task("b", 3, 2),
            task("c", 7, 8),
            task("d", -1, 1),
            task("e", 3, 1),
        ];
        let expected = scheduling_order(tasks.clone());
        // Every rotation and the reversal sort to the same sequence.
        for shift in 0..tasks.len() {
            let mut rotated = tasks.clone();
            rotated.rotate_left(shift);
            assert_eq!(scheduling_order(rotated.clone()), expected);
            rotated.reverse();
            assert_eq!(scheduling_order(rotated), expected);
        }
    }
}
