//! The `TROUPE_*` environment over a node's configuration, key by key. Every configuration key
//! has its variable, `TROUPE_<KEY>` at the top level (`TROUPE_ID`, `TROUPE_DATA_DIR`) and
//! `TROUPE_<SECTION>_<KEY>` in a section (`TROUPE_SERVING_MAX_BATCH_SIZE`), and its value is
//! parsed as the field's own type. Other `TROUPE_*` variables belong to other commands and are
//! left alone.

use std::collections::BTreeMap;

use super::*;

/// A field's value from the text of its variable.
trait FromEnv: Sized {
    fn from_env(raw: &str) -> Result<Self, String>;
}

macro_rules! from_env_by_parse {
    ($expected:literal: $($ty:ty),*) => {
        $(impl FromEnv for $ty {
            fn from_env(raw: &str) -> Result<Self, String> {
                raw.trim()
                    .parse()
                    .map_err(|e| format!("expected {}: {e}", $expected))
            }
        })*
    };
}
from_env_by_parse!("an integer": u64, usize, u32, i32);
from_env_by_parse!("a number": f64);
from_env_by_parse!("true or false": bool);

impl FromEnv for String {
    fn from_env(raw: &str) -> Result<Self, String> {
        Ok(raw.to_owned())
    }
}

impl FromEnv for PathBuf {
    fn from_env(raw: &str) -> Result<Self, String> {
        Ok(PathBuf::from(raw))
    }
}

impl<T: FromEnv> FromEnv for Option<T> {
    fn from_env(raw: &str) -> Result<Self, String> {
        T::from_env(raw).map(Some)
    }
}

/// `routing.weights` as `ID=WEIGHT,ID=WEIGHT` (e.g. `1=3,2=1`).
impl FromEnv for BTreeMap<String, u32> {
    fn from_env(raw: &str) -> Result<Self, String> {
        raw.split(',')
            .filter(|pair| !pair.trim().is_empty())
            .map(|pair| {
                let (node, weight) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("{pair:?} is not ID=WEIGHT, e.g. 1=3,2=1"))?;
                Ok((node.trim().to_owned(), u32::from_env(weight)?))
            })
            .collect()
    }
}

/// Lists every configuration key with its field: [`ENV_KEYS`] and the setter of each.
macro_rules! env_keys {
    ($($key:literal => $($field:ident).+;)*) => {
        /// Every configuration key the environment can set (its variable: `TROUPE_` and the
        /// key in capitals, with `_` for `.`).
        pub const ENV_KEYS: &[&str] = &[$($key),*];

        /// Sets `key` (one of [`ENV_KEYS`]) from `raw`.
        fn set_key(config: &mut NodeConfig, key: &str, raw: &str) -> Result<(), String> {
            match key {
                $($key => config.$($field).+ = FromEnv::from_env(raw)?,)*
                other => return Err(format!("{other} is not a configuration key")),
            }
            Ok(())
        }
    };
}

env_keys! {
    "id" => id;
    "api" => api;
    "peer" => peer;
    "metrics" => metrics;
    "http" => http;
    "data_dir" => data_dir;
    "artifact_dir" => artifact_dir;
    "insecure" => insecure;
    "raft.heartbeat_interval_ms" => raft.heartbeat_interval_ms;
    "raft.election_timeout_min_ms" => raft.election_timeout_min_ms;
    "raft.election_timeout_max_ms" => raft.election_timeout_max_ms;
    "raft.snapshot_every_entries" => raft.snapshot_every_entries;
    "raft.keep_entries_after_snapshot" => raft.keep_entries_after_snapshot;
    "raft.forward_timeout_ms" => raft.forward_timeout_ms;
    "raft.watch_history" => raft.watch_history;
    "serving.device" => serving.device;
    "serving.precision" => serving.precision;
    "serving.compute_threads" => serving.compute_threads;
    "serving.max_batch_size" => serving.max_batch_size;
    "serving.max_queue_delay_us" => serving.max_queue_delay_us;
    "serving.queue_capacity" => serving.queue_capacity;
    "serving.lanes" => serving.lanes;
    "serving.workers_per_model" => serving.workers_per_model;
    "serving.max_restarts" => serving.max_restarts;
    "serving.restart_window_s" => serving.restart_window_s;
    "serving.health_interval_ms" => serving.health_interval_ms;
    "serving.drain_timeout_ms" => serving.drain_timeout_ms;
    "serving.rollout_timeout_s" => serving.rollout_timeout_s;
    "serving.compute_nice" => serving.compute_nice;
    "serving.kv_cache_mb" => serving.kv_cache_mb;
    "serving.prefill_chunk" => serving.prefill_chunk;
    "serving.blob_bandwidth_mbps" => serving.blob_bandwidth_mbps;
    "limits.max_message_bytes" => limits.max_message_bytes;
    "limits.max_texts_per_request" => limits.max_texts_per_request;
    "limits.max_chars_per_text" => limits.max_chars_per_text;
    "limits.max_concurrent_streams" => limits.max_concurrent_streams;
    "limits.request_timeout_ms" => limits.request_timeout_ms;
    "limits.keepalive_interval_s" => limits.keepalive_interval_s;
    "limits.keepalive_timeout_s" => limits.keepalive_timeout_s;
    "limits.idle_timeout_s" => limits.idle_timeout_s;
    "limits.max_connections" => limits.max_connections;
    "limits.max_setting_value_bytes" => limits.max_setting_value_bytes;
    "limits.max_prompt_chars" => limits.max_prompt_chars;
    "limits.default_max_tokens" => limits.default_max_tokens;
    "limits.max_tokens" => limits.max_tokens;
    "limits.generate_timeout_ms" => limits.generate_timeout_ms;
    "routing.strategy" => routing.strategy;
    "routing.weights" => routing.weights;
    "routing.max_attempts" => routing.max_attempts;
    "routing.forward_connect_timeout_ms" => routing.forward_connect_timeout_ms;
    "cluster.heartbeat_interval_ms" => cluster.heartbeat_interval_ms;
    "cluster.suspect_after" => cluster.suspect_after;
    "cluster.down_after" => cluster.down_after;
    "cluster.heartbeat_timeout_ms" => cluster.heartbeat_timeout_ms;
    "cluster.backup" => cluster.backup;
    "tls.dir" => tls.dir;
    "tls.ca" => tls.ca;
    "tls.cert" => tls.cert;
    "tls.key" => tls.key;
    "tls.reload_interval_ms" => tls.reload_interval_ms;
    "auth.jwks" => auth.jwks;
    "auth.issuer" => auth.issuer;
    "auth.audience" => auth.audience;
    "auth.leeway_s" => auth.leeway_s;
}

/// The variable that sets `key`: `TROUPE_SERVING_MAX_BATCH_SIZE` for `serving.max_batch_size`.
pub fn env_name(key: &str) -> String {
    format!("TROUPE_{}", key.replace('.', "_").to_uppercase())
}

impl NodeConfig {
    /// Applies the `TROUPE_*` variable of every configuration key that `env` has ([`ENV_KEYS`]);
    /// a value that does not parse as its field's type names the variable and the type.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        for key in ENV_KEYS {
            let name = env_name(key);
            let Some(raw) = env(&name) else { continue };
            set_key(self, key, &raw).map_err(|reason| ConfigError::Env {
                name,
                value: raw,
                reason,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key of the schema (a config with every optional key set, written as TOML) has its
    /// variable, and every variable names a key of the schema.
    #[test]
    fn every_configuration_key_has_its_variable() {
        let mut config = NodeConfig {
            http: Some("127.0.0.1:7703".into()),
            artifact_dir: Some("/srv/models".into()),
            ..NodeConfig::default()
        };
        config.cluster.heartbeat_timeout_ms = Some(80);
        config.routing.weights.insert("1".into(), 2);
        config.tls = TlsSettings {
            dir: Some("d".into()),
            ca: Some("c".into()),
            cert: Some("n".into()),
            key: Some("k".into()),
            ..TlsSettings::default()
        };
        config.auth.jwks = Some("j".into());
        let table = toml::Table::try_from(&config).unwrap();
        let mut schema = Vec::new();
        for (key, value) in &table {
            match value {
                toml::Value::Table(section) => {
                    schema.extend(section.keys().map(|field| format!("{key}.{field}")))
                }
                _ => schema.push(key.clone()),
            }
        }
        schema.sort();
        let mut listed: Vec<String> = ENV_KEYS.iter().map(|k| (*k).to_owned()).collect();
        listed.sort();
        assert_eq!(listed, schema);
    }

    #[test]
    fn weights_and_optional_keys_parse_as_their_types() {
        let mut config = NodeConfig::default();
        config
            .apply_env(|name| match name {
                "TROUPE_ROUTING_WEIGHTS" => Some("1=3, 2=1".into()),
                "TROUPE_CLUSTER_HEARTBEAT_TIMEOUT_MS" => Some("80".into()),
                "TROUPE_SERVING_BLOB_BANDWIDTH_MBPS" => Some("12.5".into()),
                "TROUPE_AUTH_JWKS" => Some("/etc/troupe/jwks.json".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.routing.weights.get("1"), Some(&3));
        assert_eq!(config.routing.weights.get("2"), Some(&1));
        assert_eq!(config.cluster.heartbeat_timeout_ms, Some(80));
        assert_eq!(config.serving.blob_bandwidth_mbps, 12.5);
        assert_eq!(
            config.auth.jwks.as_deref(),
            Some(Path::new("/etc/troupe/jwks.json"))
        );
        let error = config
            .apply_env(|name| (name == "TROUPE_ROUTING_WEIGHTS").then(|| "1:3".into()))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("TROUPE_ROUTING_WEIGHTS") && error.contains("ID=WEIGHT"),
            "{error}"
        );
    }
}
