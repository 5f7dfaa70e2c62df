//! The config's file, environment and checks, with the problems each names.

use super::*;

#[test]
fn unknown_keys_and_bad_fields_are_named_with_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, "id = 2\napi = \"127.0.0.1:7700\"\nbogus = 1\n").unwrap();
    let error = NodeConfig::from_file(&path).unwrap_err().to_string();
    assert!(error.contains("bogus"), "{error}");

    let config = NodeConfig {
        id: 0,
        api: "localhost".into(),
        data_dir: dir.path().join("data"),
        insecure: true,
        ..NodeConfig::default()
    };
    let problems = config.problems();
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["id", "api"]);
    assert!(problems[1].fix.contains("IP:PORT"));

    let config = NodeConfig {
        data_dir: dir.path().join("data"),
        artifact_dir: Some(dir.path().join("missing")),
        serving: ServingSettings {
            max_batch_size: 5000,
            device: "tpu".into(),
            ..ServingSettings::default()
        },
        limits: LimitSettings {
            max_texts_per_request: 0,
            ..LimitSettings::default()
        },
        insecure: true,
        ..NodeConfig::default()
    };
    let problems = config.problems();
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "artifact_dir",
            "serving.device",
            "serving.max_batch_size",
            "limits.max_texts_per_request"
        ]
    );
    assert!(problems[1].fix.contains("--features cuda") || problems[1].fix.contains("\"cpu\""));
}

#[test]
fn environment_overrides_the_file() {
    let mut config = NodeConfig::default();
    config
        .apply_env(|name| match name {
            "TROUPE_ID" => Some("7".into()),
            "TROUPE_API" => Some("127.0.0.1:9000".into()),
            _ => None,
        })
        .unwrap();
    assert_eq!((config.id, config.api.as_str()), (7, "127.0.0.1:9000"));
    let error = config.apply_env(|name| (name == "TROUPE_ID").then(|| "x".to_owned()));
    assert!(error.unwrap_err().to_string().contains("TROUPE_ID"));

    // Section keys: TROUPE_<SECTION>_<KEY>; other TROUPE_* variables are not ours.
    let mut config = NodeConfig::default();
    config
        .apply_env(|name| match name {
            "TROUPE_SERVING_MAX_BATCH_SIZE" => Some("64".into()),
            "TROUPE_LIMITS_MAX_TEXTS_PER_REQUEST" => Some("9".into()),
            "TROUPE_ARTIFACT_DIR" => Some("/srv/models".into()),
            "TROUPE_HOME" | "TROUPE_MODEL_DIR" => Some("/elsewhere".into()),
            _ => None,
        })
        .unwrap();
    assert_eq!(config.serving.max_batch_size, 64);
    assert_eq!(config.limits.max_texts_per_request, 9);
    assert_eq!(config.artifact_dir, Some(PathBuf::from("/srv/models")));
    let error = config
        .apply_env(|name| (name == "TROUPE_SERVING_LANES").then(|| "many".to_owned()))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("TROUPE_SERVING_LANES") && error.contains("integer"),
        "{error}"
    );
}

#[test]
fn cluster_settings_come_from_the_file_and_the_environment_and_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "[cluster]\nheartbeat_interval_ms = 50\nsuspect_after = 2\ndown_after = 5\n",
    )
    .unwrap();
    let mut config = NodeConfig::from_file(&path).unwrap();
    let gossip = config.gossip_config();
    assert_eq!(gossip.heartbeat_interval, Duration::from_millis(50));
    // The timeout follows the interval unless set.
    assert_eq!(gossip.heartbeat_timeout, Duration::from_millis(50));
    assert_eq!((gossip.suspect_after, gossip.down_after), (2, 5));
    assert!(!gossip.backup);

    // The optional timeout is absent from the file and still settable from the
    // environment, like every other key.
    config
        .apply_env(|name| match name {
            "TROUPE_CLUSTER_HEARTBEAT_TIMEOUT_MS" => Some("80".into()),
            "TROUPE_CLUSTER_BACKUP" => Some("true".into()),
            "TROUPE_CLUSTER_DOWN_AFTER" => Some("7".into()),
            _ => None,
        })
        .unwrap();
    let gossip = config.gossip_config();
    assert_eq!(gossip.heartbeat_timeout, Duration::from_millis(80));
    assert_eq!(gossip.down_after, 7);
    assert!(gossip.backup);
    let error = config
        .apply_env(|name| {
            (name == "TROUPE_CLUSTER_HEARTBEAT_TIMEOUT_MS").then(|| "soon".to_owned())
        })
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("TROUPE_CLUSTER_HEARTBEAT_TIMEOUT_MS"),
        "{error}"
    );

    let config = NodeConfig {
        data_dir: dir.path().join("data"),
        cluster: ClusterSettings {
            heartbeat_interval_ms: 0,
            suspect_after: 0,
            down_after: 0,
            heartbeat_timeout_ms: Some(0),
            backup: false,
        },
        insecure: true,
        ..NodeConfig::default()
    };
    let problems = config.problems();
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "cluster.heartbeat_interval_ms",
            "cluster.suspect_after",
            "cluster.down_after",
            "cluster.heartbeat_timeout_ms"
        ]
    );
    let config = NodeConfig {
        data_dir: dir.path().join("data"),
        cluster: ClusterSettings {
            suspect_after: 4,
            down_after: 4,
            ..ClusterSettings::default()
        },
        insecure: true,
        ..NodeConfig::default()
    };
    let problems = config.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0]
        .problem
        .contains("does not exceed cluster.suspect_after (4)"));
    assert!(NodeConfig {
        data_dir: dir.path().join("data"),
        insecure: true,
        ..NodeConfig::default()
    }
    .problems()
    .is_empty());
}

#[test]
fn a_node_needs_certificates_or_insecure_and_the_refusal_names_both_fixes() {
    let bare = NodeConfig::default();
    let problems = bare.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].field, "tls");
    assert!(
        problems[0].fix.contains("troupe certs init") && problems[0].fix.contains("--insecure")
    );
    assert_eq!(bare.tls_files(), None);

    // TROUPE_TLS_DIR and TROUPE_INSECURE reach the config like every other key.
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    troupe_transport::certs::init(&certs, 2, &[]).unwrap();
    let mut config = NodeConfig {
        id: 2,
        data_dir: dir.path().join("data"),
        ..NodeConfig::default()
    };
    config
        .apply_env(|name| (name == "TROUPE_TLS_DIR").then(|| certs.display().to_string()))
        .unwrap();
    assert!(config.problems().is_empty(), "{:?}", config.problems());
    let files = config.tls_files().unwrap();
    assert_eq!(files.cert, certs.join("node-2.crt"));
    assert_eq!(files.ca, certs.join("ca.crt"));
    // The files must name this node.
    config.id = 1;
    config.tls.cert = Some(certs.join("node-2.crt"));
    config.tls.key = Some(certs.join("node-2.key"));
    let problems = config.problems();
    assert_eq!(problems[0].field, "tls.cert", "{problems:?}");
    assert!(problems[0].problem.contains("names node 2, not node 1"));
    config.tls.cert = Some(certs.join("node-1.crt"));
    let problems = config.problems();
    assert!(
        problems[0].problem.contains("does not match the key"),
        "{problems:?}"
    );
    // An explicit file overrides the directory's.
    config.tls.key = Some("/keys/two.key".into());
    assert_eq!(config.tls_files().unwrap().key, Path::new("/keys/two.key"));
    assert!(config.problems()[0].problem.contains("/keys/two.key"));
    // Both at once is a contradiction.
    config
        .apply_env(|name| (name == "TROUPE_INSECURE").then(|| "true".into()))
        .unwrap();
    assert!(config.insecure);
    assert_eq!(config.problems()[0].field, "insecure");

    // Files without a directory must come as a set.
    let partial = NodeConfig {
        tls: TlsSettings {
            ca: Some("/ca.crt".into()),
            ..TlsSettings::default()
        },
        ..NodeConfig::default()
    };
    let fields: Vec<String> = partial.problems().into_iter().map(|p| p.field).collect();
    assert_eq!(fields, ["tls.cert", "tls.key"]);
}

#[test]
fn the_http_address_comes_from_the_file_or_the_environment_and_is_checked() {
    let config: NodeConfig = toml::from_str("http = \"127.0.0.1:7703\"").unwrap();
    assert_eq!(config.http.as_deref(), Some("127.0.0.1:7703"));
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig {
        insecure: true,
        data_dir: dir.path().join("data"),
        ..NodeConfig::default()
    };
    assert!(config.problems().is_empty(), "{:?}", config.problems());
    config
        .apply_env(|name| (name == "TROUPE_HTTP").then(|| "127.0.0.1:7702".into()))
        .unwrap();
    assert_eq!(config.http.as_deref(), Some("127.0.0.1:7702"));
    let problems = config.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].field, "http");
    config.http = Some("localhost".into());
    assert!(config.problems()[0].problem.contains("not an address"));
    config.http = Some("127.0.0.1:0".into());
    assert!(config.problems().is_empty());
}
