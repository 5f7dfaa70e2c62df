//! The `TROUPE_*` environment over a node's configuration.

use super::*;

impl NodeConfig {
    /// Applies `TROUPE_<KEY>` for top-level keys (`TROUPE_ID`, `TROUPE_API`,
    /// `TROUPE_DATA_DIR`...) and `TROUPE_<SECTION>_<KEY>` for keys of every section (`[raft]`,
    /// `[serving]`, `[limits]`, `[cluster]`...: `TROUPE_SERVING_MAX_BATCH_SIZE=64`). Other `TROUPE_*` variables belong
    /// to other commands and are left alone.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let invalid = |name: &str, value: &str, reason: String| ConfigError::Env {
            name: name.to_owned(),
            value: value.to_owned(),
            reason,
        };
        let mut tree =
            toml::Table::try_from(&*self).map_err(|e| invalid("TROUPE_*", "", e.to_string()))?;
        // `artifact_dir` and `http` are absent from the tree while unset, so list the keys by
        // hand.
        let top = [
            "id",
            "api",
            "peer",
            "metrics",
            "http",
            "data_dir",
            "artifact_dir",
            "insecure",
        ];
        // Likewise optional section keys: integers, and paths (strings).
        let optional_integers = [("cluster", "heartbeat_timeout_ms")];
        let optional_paths = [
            ("tls", "dir"),
            ("tls", "ca"),
            ("tls", "cert"),
            ("tls", "key"),
            ("auth", "jwks"),
        ];
        let mut names: Vec<(String, Option<String>, String)> = top
            .iter()
            .map(|key| {
                (
                    format!("TROUPE_{}", key.to_uppercase()),
                    None,
                    (*key).to_owned(),
                )
            })
            .collect();
        for (section, value) in &tree {
            if let toml::Value::Table(table) = value {
                let optional = optional_integers
                    .iter()
                    .chain(&optional_paths)
                    .filter(|(of, key)| of == section && !table.contains_key(*key))
                    .map(|(_, key)| (*key).to_owned());
                for key in table.keys().cloned().chain(optional) {
                    names.push((
                        format!("TROUPE_{}_{}", section.to_uppercase(), key.to_uppercase()),
                        Some(section.clone()),
                        key,
                    ));
                }
            }
        }
        let mut changed = false;
        for (name, section, key) in names {
            let Some(raw) = env(&name) else { continue };
            let slot = match &section {
                None => &mut tree,
                Some(section) => match tree.get_mut(section) {
                    Some(toml::Value::Table(table)) => table,
                    _ => continue,
                },
            };
            let integer = section
                .as_deref()
                .is_some_and(|section| optional_integers.contains(&(section, key.as_str())));
            let value = match slot.get(&key) {
                None if integer => raw
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|e| invalid(&name, &raw, format!("expected an integer: {e}")))?,
                Some(toml::Value::Integer(_)) => raw
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|e| invalid(&name, &raw, format!("expected an integer: {e}")))?,
                Some(toml::Value::Float(_)) => raw
                    .parse::<f64>()
                    .map(toml::Value::Float)
                    .map_err(|e| invalid(&name, &raw, format!("expected a number: {e}")))?,
                Some(toml::Value::Boolean(_)) => raw
                    .parse::<bool>()
                    .map(toml::Value::Boolean)
                    .map_err(|e| invalid(&name, &raw, format!("expected true or false: {e}")))?,
                _ => toml::Value::String(raw.clone()),
            };
            slot.insert(key, value);
            changed = true;
        }
        if changed {
            *self = tree
                .try_into()
                .map_err(|e: toml::de::Error| invalid("TROUPE_*", "", e.to_string()))?;
        }
        Ok(())
    }
}
