//! Client trust on the API port, over real sockets: every hostile token gets its code and
//! reason, each role may call exactly its classes of RPC, client certificates carry roles,
//! denials are counted by reason, and the JWKS rotates under load without a failed request.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use common::*;
use tonic::Code;
use troupe_node::RunningNode;
use troupe_proto::v1::admin_client::AdminClient;
use troupe_proto::v1::inference_client::InferenceClient;
use troupe_proto::v1::{NodeRef, NodeStatusRequest, SetSettingRequest};
use troupe_transport::certs;
use troupe_transport::token::{self, SigningKey, JWKS_FILE, SIGNING_KEY_FILE};
use troupe_transport::{ClientTls, Role};

const WAIT: Duration = Duration::from_secs(20);

fn anonymous(certs: &Path) -> ClientTls {
    ClientTls {
        ca: certs.join("ca.crt"),
        identity: None,
    }
}

fn channel(addr: std::net::SocketAddr, tls: &ClientTls) -> tonic::transport::Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5));
    troupe_transport::connect_client_lazy(endpoint, Some(tls.config().unwrap()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token with these claims, signed EdDSA by the PEM key, naming `kid`.
fn sign(claims: serde_json::Value, kid: &str, pem: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ed_pem(pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn claims(role: &str) -> serde_json::Value {
    let now = now();
    serde_json::json!({
        "iss": "troupe", "aud": "troupe-api", "sub": "t", "role": role,
        "iat": now, "nbf": now, "exp": now + 600,
    })
}

/// NodeStatus with `token` (or none) over anonymous TLS.
async fn status_with(
    node: &RunningNode,
    certs: &Path,
    token: Option<&str>,
) -> Result<(), tonic::Status> {
    let channel = channel(node.api_addr, &anonymous(certs));
    let result = match token {
        Some(token) => AdminClient::new(authed(channel, token))
            .node_status(NodeStatusRequest {})
            .await
            .map(|_| ()),
        None => AdminClient::new(channel)
            .node_status(NodeStatusRequest {})
            .await
            .map(|_| ()),
    };
    result
}

fn denial(status: &tonic::Status) -> String {
    status
        .metadata()
        .get(troupe_transport::api_gate::DENIAL_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

async fn metric(node: &RunningNode, series: &str) -> u64 {
    let (_, body) = http_get(node.metrics_addr, "/metrics").await;
    body.lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_hostile_token_gets_its_code_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    certs::init(&certs_dir, 1, &[]).unwrap();
    let node = tls_node(&dir, &certs_dir, 1).await;
    let pem = std::fs::read_to_string(certs_dir.join(SIGNING_KEY_FILE)).unwrap();
    let key = SigningKey::load(&certs_dir.join(SIGNING_KEY_FILE)).unwrap();
    let valid = mint(&certs_dir, Role::Read);
    status_with(&node, &certs_dir, Some(&valid)).await.unwrap();

    let now = now();
    let with = |patch: serde_json::Value| {
        let mut c = claims("read");
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        sign(c, &key.kid, &pem)
    };
    let unsigned = |header: serde_json::Value| {
        format!(
            "{}.{}.",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims("admin").to_string())
        )
    };
    // HS256 with the public key as the HMAC secret: the classic algorithm confusion.
    let public_x = key.jwk["x"].as_str().unwrap().to_owned();
    let mut hs_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs_header.kid = Some(key.kid.clone());
    let hs256 = jsonwebtoken::encode(
        &hs_header,
        &claims("admin"),
        &jsonwebtoken::EncodingKey::from_secret(public_x.as_bytes()),
    )
    .unwrap();
    let (stranger, stranger_pem) = SigningKey::generate().unwrap();
    let unknown_kid = sign(claims("admin"), &stranger.kid, &stranger_pem);
    let mut tampered = valid.clone().into_bytes();
    let at = valid.rfind('.').unwrap() + 5;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let cases: Vec<(&str, Option<String>, Code, &str)> = vec![
        ("no token", None, Code::Unauthenticated, "missing"),
        (
            "alg none",
            Some(unsigned(serde_json::json!({"alg": "none", "typ": "JWT"}))),
            Code::Unauthenticated,
            "algorithm",
        ),
        (
            "HS256 signed with the public key",
            Some(hs256),
            Code::Unauthenticated,
            "algorithm",
        ),
        (
            "expired",
            Some(with(
                serde_json::json!({"exp": now - 3600, "nbf": now - 7200}),
            )),
            Code::Unauthenticated,
            "expired",
        ),
        (
            "nbf in the future",
            Some(with(
                serde_json::json!({"nbf": now + 3600, "exp": now + 7200}),
            )),
            Code::Unauthenticated,
            "not_yet_valid",
        ),
        (
            "wrong aud",
            Some(with(serde_json::json!({"aud": "someone-else"}))),
            Code::Unauthenticated,
            "wrong_audience",
        ),
        (
            "wrong iss",
            Some(with(serde_json::json!({"iss": "evil"}))),
            Code::Unauthenticated,
            "wrong_issuer",
        ),
        (
            "unknown kid",
            Some(unknown_kid),
            Code::Unauthenticated,
            "unknown_kid",
        ),
        (
            "tampered signature",
            Some(tampered),
            Code::Unauthenticated,
            "bad_signature",
        ),
        (
            "no exp",
            Some(sign(
                serde_json::json!({"iss": "troupe", "aud": "troupe-api", "role": "admin", "nbf": now}),
                &key.kid,
                &pem,
            )),
            Code::Unauthenticated,
            "bad_claims",
        ),
        (
            "an unknown role",
            Some(with(serde_json::json!({"role": "root"}))),
            Code::Unauthenticated,
            "bad_claims",
        ),
        (
            "not a JWT",
            Some("hello".into()),
            Code::Unauthenticated,
            "malformed",
        ),
        (
            "a 16 KB token",
            Some("a".repeat(16 * 1024)),
            Code::Unauthenticated,
            "too_large",
        ),
    ];
    for (case, token, code, reason) in &cases {
        let status = status_with(&node, &certs_dir, token.as_deref())
            .await
            .expect_err(case);
        assert_eq!(status.code(), *code, "{case}: {status:?}");
        assert_eq!(denial(&status), *reason, "{case}: {status:?}");
        assert!(!status.message().is_empty(), "{case}");
        // Between two hostile calls, an honest one still works.
        status_with(&node, &certs_dir, Some(&valid)).await.unwrap();
    }
    // A megabyte token is refused by HTTP/2's header limit before anything reads it: the
    // connection is closed with GOAWAY ENHANCE_YOUR_CALM, which the client sees as
    // RESOURCE_EXHAUSTED, or as a broken pipe when it was still sending.
    let huge = "a".repeat(1 << 20);
    let status = status_with(&node, &certs_dir, Some(&huge))
        .await
        .unwrap_err();
    // How the client words a connection closed under it depends on how far it got sending.
    assert!(
        matches!(
            status.code(),
            Code::ResourceExhausted | Code::Unknown | Code::Internal | Code::Unavailable
        ),
        "{status:?}"
    );
    status_with(&node, &certs_dir, Some(&valid)).await.unwrap();
    // Counted by reason, never by the client's strings.
    for reason in [
        "missing",
        "algorithm",
        "expired",
        "unknown_kid",
        "bad_signature",
    ] {
        let series = format!("troupe_api_denials_total{{node=\"1\",reason=\"{reason}\"}} ");
        assert!(metric(&node, &series).await >= 1, "{reason}");
    }
    let (_, body) = http_get(node.metrics_addr, "/metrics").await;
    assert!(!body.contains("someone-else") && !body.contains("evil"));
    // Health is public: probes need no credential.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(
        node.api_addr,
        &anonymous(&certs_dir),
    ));
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    node.shutdown().await.unwrap();
}

/// What one call of each class answers for `role`: allowed (any code but the two denials),
/// or the denial's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_role_may_call_exactly_its_classes_of_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    certs::init(&certs_dir, 1, &[]).unwrap();
    let node = tls_cluster(&dir, &certs_dir, 1).await.remove(0);

    // The code each class answers for a caller.
    async fn classes(node: &RunningNode, channel: Authed) -> [Code; 4] {
        let mut admin = AdminClient::new(channel.clone());
        let read = admin.node_status(NodeStatusRequest {}).await;
        let infer = InferenceClient::new(channel)
            .embed(embed_request("no-such-model", &["hi"], ""))
            .await;
        let operator = admin
            .set_setting(SetSettingRequest {
                key: "role-test".into(),
                value: "1".into(),
                ..Default::default()
            })
            .await;
        // Promoting a node that is not a learner: allowed means FAILED_PRECONDITION or so.
        let admin_call = admin.promote(NodeRef { id: 99 }).await;
        let _ = node;
        [
            read.map_or_else(|s| s.code(), |_| Code::Ok),
            infer.map_or_else(|s| s.code(), |_| Code::Ok),
            operator.map_or_else(|s| s.code(), |_| Code::Ok),
            admin_call.map_or_else(|s| s.code(), |_| Code::Ok),
        ]
    }
    let denied = |code: Code| matches!(code, Code::PermissionDenied | Code::Unauthenticated);
    for role in Role::ALL {
        let token = mint(&certs_dir, role);
        let codes = classes(
            &node,
            authed(channel(node.api_addr, &anonymous(&certs_dir)), &token),
        )
        .await;
        for (class, code) in [Role::Read, Role::Infer, Role::Operator, Role::Admin]
            .into_iter()
            .zip(codes)
        {
            if role.allows(class) {
                assert!(!denied(code), "{role} on a {class} RPC: {code:?}");
            } else {
                assert_eq!(code, Code::PermissionDenied, "{role} on a {class} RPC");
            }
        }
    }
    // The denial names the role the RPC needs.
    let token = mint(&certs_dir, Role::Read);
    let status = AdminClient::new(authed(
        channel(node.api_addr, &anonymous(&certs_dir)),
        &token,
    ))
    .set_setting(SetSettingRequest {
        key: "k".into(),
        value: "v".into(),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert!(status.message().contains("'operator'"), "{status:?}");

    // A client certificate carries its role: `certs add-client --role read`.
    certs::add_client(&certs_dir, "reader", Role::Read).unwrap();
    let reader = ClientTls {
        ca: certs_dir.join("ca.crt"),
        identity: Some((
            certs_dir.join("client-reader.crt"),
            certs_dir.join("client-reader.key"),
        )),
    };
    let mut client = AdminClient::new(channel(node.api_addr, &reader));
    client.node_status(NodeStatusRequest {}).await.unwrap();
    let status = client
        .set_setting(SetSettingRequest {
            key: "k".into(),
            value: "v".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // The admin certificate from `certs init` may write.
    let admin_tls = ClientTls {
        ca: certs_dir.join("ca.crt"),
        identity: Some((
            certs_dir.join("client-admin.crt"),
            certs_dir.join("client-admin.key"),
        )),
    };
    AdminClient::new(channel(node.api_addr, &admin_tls))
        .set_setting(SetSettingRequest {
            key: "k".into(),
            value: "v".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // A node's certificate grants no API role.
    let node_cert = ClientTls {
        ca: certs_dir.join("ca.crt"),
        identity: Some((certs_dir.join("node-1.crt"), certs_dir.join("node-1.key"))),
    };
    let status = AdminClient::new(channel(node.api_addr, &node_cert))
        .node_status(NodeStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_jwks_rotates_under_load_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    certs::init(&certs_dir, 3, &[]).unwrap();
    let nodes = tls_cluster(&dir, &certs_dir, 3).await;
    // The token clients send; swapped once every node knows the new key.
    let old_token = mint(&certs_dir, Role::Operator);
    let current = Arc::new(Mutex::new(old_token.clone()));
    let mut writers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let (channel, current) = (
            channel(node.api_addr, &anonymous(&certs_dir)),
            current.clone(),
        );
        writers.push(move |n: u64| {
            let token = current.lock().unwrap().clone();
            let mut client = AdminClient::new(authed(channel.clone(), &token));
            async move {
                client
                    .set_setting(SetSettingRequest {
                        key: format!("load-{i}"),
                        value: n.to_string(),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
            }
        });
    }
    let load = WriteLoad::start(writers);
    load.progress(30).await;
    // 1. A new signing key; both keys are in the JWKS.
    let (old_kid, new_kid) = token::rotate_signing_key(&certs_dir).unwrap();
    let new_token = mint(&certs_dir, Role::Operator);
    for node in &nodes {
        wait_for("every node to accept the new key", WAIT, || async {
            status_with(node, &certs_dir, Some(&new_token)).await.ok()
        })
        .await;
    }
    // 2. Clients move to the new token.
    *current.lock().unwrap() = new_token.clone();
    load.progress(30).await;
    // 3. The old key is retired: its tokens stop working everywhere.
    let jwks = std::fs::read_to_string(certs_dir.join(JWKS_FILE)).unwrap();
    assert!(jwks.contains(&old_kid) && jwks.contains(&new_kid));
    token::retire_key(&certs_dir, &old_kid).unwrap();
    for node in &nodes {
        wait_for("every node to drop the old key", WAIT, || async {
            match status_with(node, &certs_dir, Some(&old_token)).await {
                Err(status) if denial(&status) == "unknown_kid" => Some(()),
                _ => None,
            }
        })
        .await;
    }
    load.progress(30).await;
    let (done, failed) = load.stop().await;
    assert_eq!(failed, 0, "requests failed during the rotation");
    assert!(done >= 90, "{done}");
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}
