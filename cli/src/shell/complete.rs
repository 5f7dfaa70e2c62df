//! Tab completion: command and subcommand names, then model names and versions, task names
//! and actor paths as the node last reported them.

use std::sync::{Arc, Mutex, PoisonError};

use rustyline::completion::{Completer, Pair};
use rustyline::{Context, Helper, Highlighter, Hinter, Validator};

use super::commands::{command_names, subcommand_names};

/// What the node last reported, shared by the prompt loop (which refreshes it) and the
/// completer.
#[derive(Clone, Default)]
pub struct Names {
    inner: Arc<Mutex<Known>>,
}

#[derive(Default)]
struct Known {
    /// (model, version) pairs.
    models: Vec<(String, String)>,
    tasks: Vec<String>,
    actors: Vec<String>,
}

impl Names {
    fn with<T>(&self, f: impl FnOnce(&mut Known) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn set_models(&self, models: Vec<(String, String)>) {
        self.with(|k| k.models = models);
    }

    pub fn set_tasks(&self, tasks: Vec<String>) {
        self.with(|k| k.tasks = tasks);
    }

    pub fn set_actors(&self, actors: Vec<String>) {
        self.with(|k| k.actors = actors);
    }

    /// Candidates for the word after `before` (the words already typed).
    pub fn candidates(&self, before: &[&str]) -> Vec<String> {
        let mut names: Vec<String> = match before {
            [] => command_names(),
            ["help"] => command_names(),
            [command] => subcommand_names(command),
            ["models", "activate" | "retire"]
            | ["embed" | "similar" | "generate" | "chat", "--model"] => {
                self.with(|k| k.models.iter().map(|(m, _)| m.clone()).collect())
            }
            ["models", "activate" | "retire", model] => self.with(|k| {
                k.models
                    .iter()
                    .filter(|(m, _)| m == model)
                    .map(|(_, v)| v.clone())
                    .collect()
            }),
            ["priorities", "set"] => self.with(|k| k.tasks.clone()),
            ["actor", "restart"] | ["cluster", "restart-actor"] => self.with(|k| k.actors.clone()),
            _ => Vec::new(),
        };
        names.sort();
        names.dedup();
        names
    }
}

#[derive(Helper, Hinter, Highlighter, Validator)]
pub struct ShellHelper {
    names: Names,
}

impl ShellHelper {
    pub fn new(names: Names) -> Self {
        Self { names }
    }
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let head = &line[..pos];
        let start = head.rfind(char::is_whitespace).map_or(0, |i| i + 1);
        let before: Vec<&str> = head[..start].split_whitespace().collect();
        let partial = &head[start..];
        let pairs = self
            .names
            .candidates(&before)
            .into_iter()
            .filter(|name| name.starts_with(partial))
            .map(|name| Pair {
                display: name.clone(),
                replacement: format!("{name} "),
            })
            .collect();
        Ok((start, pairs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_commands_then_names() {
        let names = Names::default();
        names.set_models(vec![
            ("minilm".into(), "v1".into()),
            ("minilm".into(), "v2".into()),
            ("tiny".into(), "1".into()),
        ]);
        names.set_actors(vec!["node/health".into()]);
        assert!(names.candidates(&[]).contains(&"models".to_owned()));
        assert_eq!(
            names.candidates(&["models"]),
            ["activate", "fetch", "list", "push", "register", "retire"]
        );
        assert_eq!(
            names.candidates(&["models", "activate"]),
            ["minilm", "tiny"]
        );
        assert_eq!(
            names.candidates(&["models", "retire", "minilm"]),
            ["v1", "v2"]
        );
        assert_eq!(names.candidates(&["actor", "restart"]), ["node/health"]);
        assert_eq!(
            names.candidates(&["cluster", "restart-actor"]),
            ["node/health"]
        );
        assert!(names.candidates(&["cluster"]).contains(&"nodes".to_owned()));
        assert!(names.candidates(&["status", "x"]).is_empty());
    }
}
