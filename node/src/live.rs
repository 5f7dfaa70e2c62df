//! Cluster settings that take effect at run time, on every node, through the metadata watch.
//!
//! A cluster setting (`troupe settings set KEY VALUE`, Raft-ordered) named after a key of the
//! node's configuration (`limits.…`, `routing.…`, `serving.…`, …) must be one of
//! [`RUNTIME_KEYS`]: the per-request limits and the number of nodes a request may try. Each
//! node overlays them on its own config file's values as it applies the write, so every node
//! changes at the same point of the log; an empty value unsets the key (each node goes back to
//! its file's value). The other configuration keys (ports, TLS, Raft timing, batch shapes,
//! connection limits) are read once at start and are refused as cluster settings, naming the
//! config file key to use instead. Keys outside the configuration's sections (`app/flag`,
//! `bench/…`) are the cluster's own key-value data: stored, replicated and watched, read by
//! nothing in troupe.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use troupe_consensus::metadata::{Change, ChangeValue, MetadataState};
use troupe_consensus::{Metadata, WatchEvent};

use crate::config::{LimitSettings, NodeConfig, Problems, RoutingSettings};

/// The node's configuration sections: a setting `SECTION.KEY` names node configuration.
const CONFIG_SECTIONS: &[&str] = &[
    "raft", "serving", "limits", "routing", "cluster", "tls", "auth",
];

/// The largest value a run-time key takes (they are counts, characters and milliseconds).
const MAX_VALUE: u64 = u32::MAX as u64;

/// What a request is checked against and how far it may be routed: the node's config values,
/// overlaid by the run-time cluster settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_texts_per_request: usize,
    pub max_chars_per_text: usize,
    pub request_timeout_ms: u64,
    pub max_prompt_chars: usize,
    pub default_max_tokens: usize,
    pub max_tokens: usize,
    pub generate_timeout_ms: u64,
    /// Nodes one request may try (`routing.max_attempts`).
    pub max_attempts: usize,
}

/// The configuration sections the run-time keys belong to: a node's own, or overlaid.
#[derive(Debug, Clone, PartialEq)]
pub struct Sections {
    pub limits: LimitSettings,
    pub routing: RoutingSettings,
}

impl Sections {
    pub fn of(config: &NodeConfig) -> Self {
        Self {
            limits: config.limits.clone(),
            routing: config.routing.clone(),
        }
    }
}

/// One run-time key: its name and the configuration field it sets.
pub struct RuntimeKey {
    pub key: &'static str,
    set: fn(&mut Sections, u64),
}

/// Every cluster setting that changes a running node.
pub const RUNTIME_KEYS: &[RuntimeKey] = &[
    RuntimeKey {
        key: "limits.max_texts_per_request",
        set: |s, v| s.limits.max_texts_per_request = v as usize,
    },
    RuntimeKey {
        key: "limits.max_chars_per_text",
        set: |s, v| s.limits.max_chars_per_text = v as usize,
    },
    RuntimeKey {
        key: "limits.request_timeout_ms",
        set: |s, v| s.limits.request_timeout_ms = v,
    },
    RuntimeKey {
        key: "limits.max_prompt_chars",
        set: |s, v| s.limits.max_prompt_chars = v as usize,
    },
    RuntimeKey {
        key: "limits.default_max_tokens",
        set: |s, v| s.limits.default_max_tokens = v as usize,
    },
    RuntimeKey {
        key: "limits.max_tokens",
        set: |s, v| s.limits.max_tokens = v as usize,
    },
    RuntimeKey {
        key: "limits.generate_timeout_ms",
        set: |s, v| s.limits.generate_timeout_ms = v,
    },
    RuntimeKey {
        key: "routing.max_attempts",
        set: |s, v| s.routing.max_attempts = v as usize,
    },
];

impl RequestLimits {
    /// The values of the node's own configuration.
    pub fn of(config: &NodeConfig) -> Self {
        Self::from(&Sections::of(config))
    }
}

impl From<&Sections> for RequestLimits {
    fn from(sections: &Sections) -> Self {
        let limits = &sections.limits;
        Self {
            max_texts_per_request: limits.max_texts_per_request,
            max_chars_per_text: limits.max_chars_per_text,
            request_timeout_ms: limits.request_timeout_ms,
            max_prompt_chars: limits.max_prompt_chars,
            default_max_tokens: limits.default_max_tokens,
            max_tokens: limits.max_tokens,
            generate_timeout_ms: limits.generate_timeout_ms,
            max_attempts: sections.routing.max_attempts.max(1),
        }
    }
}

/// Why a cluster setting is refused before it is stored.
#[derive(Debug, thiserror::Error)]
pub enum SettingError {
    #[error("{key} is node configuration read at start, not a run-time setting: set it in each node's config file ([{section}] {field}) or {env}; the run-time settings are {}", runtime_names())]
    NotRuntime {
        key: String,
        section: String,
        field: String,
        env: String,
    },
    #[error("{key} names no configuration key (the [{section}] section has no {field}): the run-time settings are {}; a key of the cluster's own data may not start with a configuration section's name", runtime_names())]
    Unknown {
        key: String,
        section: String,
        field: String,
    },
    #[error("{key} = {value:?}: {problem}; use a whole number 1..={MAX_VALUE}, or \"\" to go back to each node's own value")]
    Invalid {
        key: String,
        value: String,
        problem: String,
    },
}

fn runtime_names() -> String {
    RUNTIME_KEYS
        .iter()
        .map(|k| k.key)
        .collect::<Vec<_>>()
        .join(", ")
}

fn runtime_key(key: &str) -> Option<&'static RuntimeKey> {
    RUNTIME_KEYS.iter().find(|k| k.key == key)
}

/// A run-time key's value: a whole number 1..=[`MAX_VALUE`].
fn parse(value: &str) -> Result<u64, String> {
    match value.trim().parse::<u64>() {
        Ok(0) => Err("must be positive".into()),
        Ok(v) if v > MAX_VALUE => Err(format!("above {MAX_VALUE}")),
        Ok(v) => Ok(v),
        Err(_) => Err("not a whole number".into()),
    }
}

/// Checks a cluster setting at the edge, before it is replicated: a key naming node
/// configuration must be a run-time key with a value it takes (or "" to unset it).
pub fn check(key: &str, value: &str) -> Result<(), SettingError> {
    let Some((section, field)) = key
        .split_once('.')
        .filter(|(section, _)| CONFIG_SECTIONS.contains(section))
    else {
        return Ok(());
    };
    if !crate::config::ENV_KEYS.contains(&key) {
        return Err(SettingError::Unknown {
            key: key.to_owned(),
            section: section.to_owned(),
            field: field.to_owned(),
        });
    }
    if runtime_key(key).is_none() {
        return Err(SettingError::NotRuntime {
            key: key.to_owned(),
            section: section.to_owned(),
            field: field.to_owned(),
            env: crate::config::env_name(key),
        });
    }
    if value.is_empty() {
        return Ok(());
    }
    parse(value)
        .map(|_| ())
        .map_err(|problem| SettingError::Invalid {
            key: key.to_owned(),
            value: value.to_owned(),
            problem,
        })
}

/// `base` overlaid with the run-time keys among `settings`. A value this node cannot take
/// (stored before the check existed) is skipped, keeping the node's value for that key, with
/// a warning. When the overlaid sections fail the configuration's own checks (a combination
/// that does not fit this node's values, such as a default above its maximum), every
/// run-time key is dropped and the node keeps its own limits, with a warning naming why.
pub fn overlay(base: &Sections, settings: &BTreeMap<String, String>) -> RequestLimits {
    let mut sections = base.clone();
    for runtime in RUNTIME_KEYS {
        let Some(value) = settings.get(runtime.key).filter(|v| !v.is_empty()) else {
            continue;
        };
        match parse(value) {
            Ok(v) => (runtime.set)(&mut sections, v),
            Err(problem) => tracing::warn!(
                key = runtime.key,
                value,
                %problem,
                "cluster setting ignored: this node keeps its own value"
            ),
        }
    }
    let mut problems = Problems::default();
    sections.limits.check(&mut problems);
    sections.routing.check(&mut problems);
    let problems = problems.into_vec();
    if problems.is_empty() {
        return RequestLimits::from(&sections);
    }
    for problem in problems {
        tracing::warn!(
            %problem,
            "cluster settings do not fit this node's config: it keeps its own limits"
        );
    }
    RequestLimits::from(base)
}

/// The request limits a node serves with now. Cloning shares them.
#[derive(Clone)]
pub struct LiveLimits(watch::Receiver<RequestLimits>);

impl LiveLimits {
    /// Limits that never change (a node's config alone; for tests and tools).
    pub fn fixed(limits: RequestLimits) -> Self {
        Self(watch::channel(limits).1)
    }

    pub fn get(&self) -> RequestLimits {
        *self.0.borrow()
    }
}

fn settings_of(state: &MetadataState) -> BTreeMap<String, String> {
    state
        .settings
        .iter()
        .map(|(key, record)| (key.clone(), record.value.clone()))
        .collect()
}

/// Follows the cluster settings: the limits start as `base` overlaid with the settings the
/// node has applied, and change as each setting write applies here, while the returned future
/// runs (the node runs it as a background task, until it stops).
pub async fn follow(
    metadata: Arc<Metadata>,
    base: Sections,
) -> (
    LiveLimits,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (state, revision) = metadata.snapshot_state().await;
    let mut settings = settings_of(&state);
    let (sender, receiver) = watch::channel(overlay(&base, &settings));
    let task = async move {
        let mut watch = metadata.watch_resyncing(revision + 1);
        loop {
            match watch.next().await {
                Ok(WatchEvent::Resync { state, .. }) => settings = settings_of(&state),
                Ok(WatchEvent::Change(Change {
                    value: ChangeValue::Setting { key, record },
                    ..
                })) if runtime_key(&key).is_some() => {
                    settings.insert(key, record.value);
                }
                Ok(WatchEvent::Change(_)) => continue,
                Err(error) => {
                    tracing::debug!(%error, "settings watch ended");
                    return;
                }
            }
            let limits = overlay(&base, &settings);
            sender.send_if_modified(|current| {
                let changed = *current != limits;
                if changed {
                    tracing::info!(?limits, "request limits changed by cluster settings");
                }
                *current = limits;
                changed
            });
        }
    };
    (LiveLimits(receiver), task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Sections {
        Sections::of(&NodeConfig::default())
    }

    fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn configuration_keys_must_be_run_time_keys_with_positive_values() {
        check("limits.max_texts_per_request", "4").unwrap();
        check("routing.max_attempts", "").unwrap();
        check("app/feature", "anything").unwrap();
        check("bench/1", "x").unwrap();
        check("my.own.key", "x").unwrap();
        let error = check("limits.max_connections", "9")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("[limits] max_connections")
                && error.contains("TROUPE_LIMITS_MAX_CONNECTIONS"),
            "{error}"
        );
        assert!(error.contains("limits.max_texts_per_request"), "{error}");
        let typo = check("limits.max_token", "9").unwrap_err().to_string();
        assert!(typo.contains("names no configuration key"), "{typo}");
        for bad in ["0", "-1", "ten", "1.5", "99999999999"] {
            let error = check("limits.max_tokens", bad).unwrap_err().to_string();
            assert!(error.contains("limits.max_tokens"), "{bad}: {error}");
        }
    }

    #[test]
    fn settings_overlay_the_node_s_values_and_an_empty_value_unsets() {
        let base = base();
        let own = RequestLimits::from(&base);
        let limits = overlay(
            &base,
            &settings(&[
                ("limits.max_texts_per_request", "3"),
                ("routing.max_attempts", "1"),
                ("limits.request_timeout_ms", ""),
                ("app/unrelated", "7"),
            ]),
        );
        assert_eq!(limits.max_texts_per_request, 3);
        assert_eq!(limits.max_attempts, 1);
        assert_eq!(limits.request_timeout_ms, own.request_timeout_ms);
        assert_eq!(overlay(&base, &settings(&[])), own);
    }

    #[test]
    fn a_combination_that_does_not_fit_keeps_the_node_s_values() {
        let base = base();
        let own = RequestLimits::from(&base);
        let too_high = (own.max_tokens + 1).to_string();
        // The config file's own rule refuses it: every run-time key is dropped.
        assert_eq!(
            overlay(
                &base,
                &settings(&[
                    ("limits.default_max_tokens", &too_high),
                    ("limits.max_texts_per_request", "3"),
                ])
            ),
            own
        );
        // Raised together, they fit.
        let higher = (own.max_tokens + 10).to_string();
        let both = overlay(
            &base,
            &settings(&[
                ("limits.default_max_tokens", &too_high),
                ("limits.max_tokens", &higher),
            ]),
        );
        assert_eq!(both.max_tokens, own.max_tokens + 10);
        assert_eq!(both.default_max_tokens, own.max_tokens + 1);
        // A value stored before the check existed is skipped; the others apply.
        let skipped = overlay(
            &base,
            &settings(&[
                ("limits.max_tokens", "lots"),
                ("limits.max_texts_per_request", "3"),
            ]),
        );
        assert_eq!(skipped.max_tokens, own.max_tokens);
        assert_eq!(skipped.max_texts_per_request, 3);
    }
}
