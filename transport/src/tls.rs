//! TLS material from PEM files, the rustls configurations built from it, and reloading: a
//! [`TlsState`] always holds the newest configuration that loaded cleanly, so a rotated
//! certificate takes effect for every new connection without a restart, and a broken file
//! never replaces a working one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::identity::Identity;

/// The one crypto provider troupe uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where a party's TLS files are: the CA bundle it trusts, and its own certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// One or more CA certificates (PEM). During a rotation it holds the old and the new CA.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Node `id`'s files in a directory made by `troupe certs init`.
    pub fn for_node(dir: &Path, id: u64) -> Self {
        Self {
            ca: dir.join("ca.crt"),
            cert: dir.join(format!("node-{id}.crt")),
            key: dir.join(format!("node-{id}.key")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{what} {path} is not usable: {reason}")]
    Invalid {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn invalid(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::Invalid {
        what,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Every certificate in a PEM file; an empty or garbled file is an error.
pub fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(what, path, "it holds no CERTIFICATE block"));
    }
    Ok(certs)
}

/// A CA bundle as a root store.
pub fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates("CA bundle", path)? {
        roots.add(cert).map_err(|e| invalid("CA bundle", path, e))?;
    }
    Ok(roots)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read("private key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| invalid("private key", path, e))
}

/// A certificate chain with its key, checked to belong together.
fn certified_key(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = certificates("certificate", cert)?;
    let key_der = private_key(key)?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der.clone_key())
        .map_err(|e| invalid("private key", key, e))?;
    let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
    certified.keys_match().map_err(|e| {
        invalid(
            "certificate",
            cert,
            format!("it does not match the key {}: {e}", key.display()),
        )
    })?;
    Ok((chain, key_der))
}

const ALPN_H2: &[u8] = b"h2";

/// What a node serves and connects with, built from one consistent read of its files.
pub struct Material {
    /// Both ports: a client certificate is asked for but not required by the handshake, so a
    /// peer without one gets a gRPC `UNAUTHENTICATED` that says so instead of a bare TLS
    /// alert. A certificate that is presented must chain to the CA bundle and be in date.
    pub server: Arc<ServerConfig>,
    /// Outgoing connections to peers, presenting this node's certificate.
    pub client: Arc<ClientConfig>,
    /// Whom this node's own certificate names.
    pub identity: Identity,
    /// The certificate's expiry, as Unix seconds.
    pub not_after: i64,
    /// sha256 of the three files, to notice when they change.
    pub fingerprint: String,
}

impl Material {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let roots = Arc::new(roots(&files.ca)?);
        let (chain, key) = certified_key(&files.cert, &files.key)?;
        let identity = Identity::from_certificate(&chain[0])
            .map_err(|reason| invalid("certificate", &files.cert, reason))?;
        let not_after = x509_parser::parse_x509_certificate(&chain[0])
            .map(|(_, cert)| cert.validity().not_after.timestamp())
            .unwrap_or_default();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| invalid("certificate", &files.cert, e))?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        let client = client_config(roots, Some((chain, key)))?;
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            identity,
            not_after,
            fingerprint: fingerprint(files),
        })
    }
}

/// A client configuration trusting `roots`, presenting `identity` when given.
pub fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_webpki_verifier(verifier);
    let mut config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The TLS settings of a CLI or test client: trust `ca`, present `cert`/`key` if given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    pub fn config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let identity = match &self.identity {
            Some((cert, key)) => Some(certified_key(cert, key)?),
            None => None,
        };
        Ok(Arc::new(client_config(
            Arc::new(roots(&self.ca)?),
            identity,
        )?))
    }
}

/// sha256 over the files' bytes (a missing file hashes as empty), so a change to any of them,
/// including a rename over the old path, is seen.
fn fingerprint(files: &TlsFiles) -> String {
    let mut hash = Sha256::new();
    for path in [&files.ca, &files.cert, &files.key] {
        hash.update(std::fs::read(path).unwrap_or_default());
        hash.update([0u8]);
    }
    hex::encode(hash.finalize())
}

/// A node's TLS files and the newest configuration that loaded from them.
pub struct TlsState {
    files: TlsFiles,
    current: RwLock<Arc<Material>>,
    reloads: std::sync::atomic::AtomicU64,
    reload_failures: std::sync::atomic::AtomicU64,
}

impl TlsState {
    /// Loads the files; a node does not start on files that do not load.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let material = Material::load(&files)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(material)),
            reloads: Default::default(),
            reload_failures: Default::default(),
        }))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration new connections use.
    pub fn current(&self) -> Arc<Material> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the files if they changed. `Ok(true)`: the new material is in use.
    /// On an error the old material stays in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        if fingerprint(&self.files) == self.current().fingerprint {
            return Ok(false);
        }
        match Material::load(&self.files).and_then(|material| {
            let identity = &self.current().identity;
            if material.identity == *identity {
                Ok(material)
            } else {
                Err(invalid(
                    "certificate",
                    &self.files.cert,
                    format!(
                        "it names {}, but this party is {identity}",
                        material.identity
                    ),
                ))
            }
        }) {
            Ok(material) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(material);
                self.reloads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(true)
            }
            Err(error) => {
                self.reload_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(error)
            }
        }
    }

    /// Successful reloads since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reloads that failed (the old material stayed in use).
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Re-reads the files every `interval`, and at once whenever `now` is notified (SIGHUP),
    /// until the state is dropped or the returned future is (the caller runs it as a task of
    /// its own, until it stops). Files are usually replaced one at a time, so a
    /// certificate whose key has not arrived yet fails once and is picked up on a later pass.
    pub fn reloader(
        self: &Arc<Self>,
        interval: Duration,
        now: Arc<tokio::sync::Notify>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let state = Arc::downgrade(self);
        async move {
            let mut last_error: Option<(TlsError, SystemTime)> = None;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = now.notified() => {}
                }
                let Some(state) = state.upgrade() else { return };
                match state.reload() {
                    Ok(true) => {
                        let material = state.current();
                        tracing::info!(identity = %material.identity, not_after = material.not_after, "reloaded TLS certificates");
                        last_error = None;
                    }
                    Ok(false) => {}
                    Err(error) => {
                        // Say it once per distinct error, not on every pass.
                        if last_error.as_ref().map(|(e, _)| e) != Some(&error) {
                            tracing::error!(%error, "cannot reload TLS certificates; the previous ones stay in use until the files are fixed");
                            last_error = Some((error, SystemTime::now()));
                        }
                    }
                }
            }
        }
    }
}
