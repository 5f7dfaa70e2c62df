//! What the fuzz targets in `fuzz/` feed arbitrary bytes to, and what `tests/fuzz_corpora.rs`
//! replays their corpora through on the stable toolchain. Each entry runs one edge where
//! untrusted bytes become troupe values; none may panic, whatever the input.

use std::sync::OnceLock;

use prost::Message;
use troupe_consensus::metadata::state::check_command;
use troupe_consensus::metadata::{Command, ModelState};
use troupe_proto::v1;

/// Protobuf request bodies to the checks the API runs on them, the first byte choosing the
/// message: Embed, SetSetting, SetPriority, RegisterModel, SetModelState, a push header,
/// ClusterInit.
pub fn proto(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 7 {
        0 => {
            if let Ok(request) = v1::EmbedRequest::decode(body) {
                let _ = troupe_proto::convert::check_embed_names(&request);
                let _ = troupe_proto::convert::EmbedCall::try_from(request);
            }
        }
        1 => {
            if let Ok(request) = v1::SetSettingRequest::decode(body) {
                let _ = check_command(&Command::SetSetting {
                    key: request.key,
                    value: request.value,
                });
            }
        }
        2 => {
            if let Ok(request) = v1::SetPriorityRequest::decode(body) {
                let _ = check_command(&Command::SetTaskPriority {
                    name: request.name,
                    priority: request.priority,
                });
            }
        }
        3 => {
            if let Ok(request) = v1::RegisterModelRequest::decode(body) {
                let _ = check_command(&Command::RegisterModelVersion {
                    name: request.name,
                    version: request.version,
                    digest: request.digest,
                    size_bytes: request.size_bytes,
                    format: request.format,
                    source: None,
                    precision: (!request.precision.is_empty()).then_some(request.precision),
                });
            }
        }
        4 => {
            if let Ok(request) = v1::SetModelStateRequest::decode(body) {
                let _ = check_command(&Command::SetModelState {
                    name: request.name,
                    version: request.version,
                    state: ModelState::Wanted,
                    traffic_weight: request.traffic_weight,
                    reason: None,
                    requested_at_unix_ms: None,
                });
            }
        }
        5 => {
            if let Ok(header) = v1::PushModelHeader::decode(body) {
                let _ = crate::server::push::manifest_of(&header);
            }
        }
        _ => {
            if let Ok(request) = v1::ClusterInitRequest::decode(body) {
                for member in request.members {
                    let _ = crate::server::admin::check_member(Some(member));
                }
            }
        }
    }
}

/// A Raft payload as the peer port decodes it, through the guard.
pub fn raft_payload(data: &[u8]) {
    troupe_consensus::network::fuzz_payload(data);
}

/// A node config file, then the values derived from it. (`problems()` is left out: it
/// touches the file system.)
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mut config) = toml::from_str::<crate::config::NodeConfig>(text) {
        let _ = config.conn_limits();
        let _ = config.routing_strategy();
        let _ = config.jwks_path();
        let _ = config.token_policy();
        // The environment overlay, with every variable set to the same text.
        let value = text.lines().next().unwrap_or_default().to_owned();
        let _ = config.apply_env(|name| name.ends_with('D').then(|| value.clone()));
    }
}

/// A bearer token (and a JWKS) as the API gate reads them.
pub fn token(data: &[u8]) {
    static VERIFIER: OnceLock<(
        troupe_transport::Verifier,
        troupe_transport::token::SigningKey,
    )> = OnceLock::new();
    let (verifier, key) = VERIFIER.get_or_init(|| {
        let (key, _) = troupe_transport::token::SigningKey::generate()
            .unwrap_or_else(|e| panic!("cannot make a key: {e}"));
        let jwks = serde_json::json!({ "keys": [key.jwk.clone()] }).to_string();
        let keys = troupe_transport::token::Jwks::parse(&jwks)
            .unwrap_or_else(|e| panic!("the JWKS of a new key does not parse: {e}"));
        (
            troupe_transport::Verifier::new(troupe_transport::TokenPolicy::default(), keys),
            key,
        )
    });
    let text = String::from_utf8_lossy(data);
    let _ = verifier.verify(&text);
    // The same bytes under a real header, so the claims parser sees them too.
    let header = base64_url(&format!(r#"{{"alg":"EdDSA","kid":"{}"}}"#, key.kid));
    let _ = verifier.verify(&format!("{header}.{}.c2ln", base64_url(&text)));
    let _ = troupe_transport::token::Jwks::parse(&text);
}

fn base64_url(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

/// A stored artifact manifest, and its paths as a push would check them.
pub fn manifest(data: &[u8]) {
    if let Ok(manifest) = serde_json::from_slice::<troupe_models::artifact::Manifest>(data) {
        for file in &manifest.files {
            let _ = troupe_models::artifact::check_manifest_path(&file.path);
        }
        let _ = manifest.digest();
        let _ = manifest.total_bytes();
    }
    let _ = troupe_models::artifact::check_manifest_path(&String::from_utf8_lossy(data));
}

/// One fuzzed edge: what it does with arbitrary bytes.
pub type Entry = fn(&[u8]);

/// The targets by name, as `fuzz/fuzz_targets/` and `fuzz/corpus/` name them.
pub const TARGETS: &[(&str, Entry)] = &[
    ("proto", proto),
    ("raft_payload", raft_payload),
    ("config", config),
    ("token", token),
    ("manifest", manifest),
];
