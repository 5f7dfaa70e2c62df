//! The cluster CA and its certificates (`troupe certs init`, `troupe certs add-node`).
//!
//! - `ca.crt`, `ca.key`: a self-signed CA (ECDSA P-256), 10 years.
//! - `node-<id>.crt`, `node-<id>.key`: node `id`, for server and client auth, valid for
//!   127.0.0.1, ::1, localhost and every extra host name, named `spiffe://troupe/node/<id>`.
//! - `client-admin.crt`, `client-admin.key`: a client certificate (client auth only), named
//!   `spiffe://troupe/client/admin` with the API role `spiffe://troupe/role/admin`; the peer
//!   port never accepts it.
//!
//! - `jwt-signing.key`, `jwks.json`: the Ed25519 key `troupe token issue` signs API tokens
//!   with, and the public keys nodes verify them with ([`crate::token`]).
//!
//! Keys are written with mode 0600, and an existing file is never overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::identity::{role_uri, valid_client_name, Identity};
use crate::token::Role;

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0} already exists: troupe never overwrites certificates (use another --out, or `troupe certs add-node` to add one)")]
    Exists(String),
    #[error("cannot write {path}: {reason}")]
    Write { path: String, reason: String },
    #[error("cannot read {path}: {reason} (is it a directory made by `troupe certs init`?)")]
    Read { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// How long certificates are valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clocks differ a little) for `days`.
    pub fn days(days: i64) -> Self {
        let now = time::OffsetDateTime::now_utc();
        Self {
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(days),
        }
    }
}

/// Node and client certificates last a year; the CA ten.
pub const LEAF_DAYS: i64 = 365;
pub const CA_DAYS: i64 = 3650;

/// A CA that can issue certificates.
pub struct Authority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Authority {
    /// A new self-signed CA named `common_name`.
    pub fn generate(common_name: &str, validity: Validity) -> Result<Self, CertsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "troupe");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA in `ca.crt` and `ca.key`.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CertsError> {
        let cert_pem = read(cert)?;
        let key = KeyPair::from_pem(&read(key)?).map_err(|e| {
            CertsError::Invalid(format!("{} is not a private key: {e}", key.display()))
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| {
            CertsError::Invalid(format!("{} is not a CA certificate: {e}", cert.display()))
        })?;
        Ok(Self { cert_pem, issuer })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate naming `identity`. Nodes get server and client auth and the `hosts` as
    /// DNS names or IP addresses; clients get client auth only.
    pub fn issue(
        &self,
        identity: &Identity,
        hosts: &[String],
        validity: Validity,
    ) -> Result<Issued, CertsError> {
        self.issue_with_role(identity, None, hosts, validity)
    }

    /// As [`Authority::issue`]; a client certificate also names its API `role`.
    pub fn issue_with_role(
        &self,
        identity: &Identity,
        role: Option<Role>,
        hosts: &[String],
        validity: Validity,
    ) -> Result<Issued, CertsError> {
        let key = KeyPair::generate()?;
        let mut params = match identity {
            Identity::Node(_) => CertificateParams::new(hosts.to_vec())
                .map_err(|e| CertsError::Invalid(format!("a host name is not valid: {e}")))?,
            Identity::Client(_) => CertificateParams::default(),
        };
        let uri = identity
            .uri()
            .try_into()
            .map_err(|e: rcgen::Error| CertsError::Invalid(e.to_string()))?;
        params.subject_alt_names.push(SanType::URI(uri));
        if let (Identity::Client(_), Some(role)) = (identity, role) {
            let uri = role_uri(role)
                .try_into()
                .map_err(|e: rcgen::Error| CertsError::Invalid(e.to_string()))?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            match identity {
                Identity::Node(id) => format!("troupe node {id}"),
                Identity::Client(name) => format!("troupe client {name}"),
            },
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "troupe");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match identity {
            Identity::Node(_) => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Identity::Client(_) => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn read(path: &Path) -> Result<String, CertsError> {
    std::fs::read_to_string(path).map_err(|e| CertsError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Writes a new file (never replacing one); keys get mode 0600.
pub fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), CertsError> {
    let error = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertsError::Exists(path.display().to_string())
        } else {
            CertsError::Write {
                path: path.display().to_string(),
                reason: e.to_string(),
            }
        }
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).map_err(error)?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(error)
}

/// The host names every node certificate is valid for, plus `extra`.
pub fn node_hosts(extra: &[String]) -> Vec<String> {
    let mut hosts: Vec<String> = ["127.0.0.1", "::1", "localhost"]
        .iter()
        .map(|h| (*h).to_owned())
        .collect();
    for host in extra {
        if !hosts.contains(host) {
            hosts.push(host.clone());
        }
    }
    hosts
}

/// What `certs init` wrote.
#[derive(Debug)]
pub struct Written {
    pub files: Vec<PathBuf>,
}

fn check_host(host: &str) -> Result<(), CertsError> {
    let ok = host.parse::<std::net::IpAddr>().is_ok()
        || (!host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            }));
    if ok {
        Ok(())
    } else {
        Err(CertsError::Invalid(format!(
            "--host {host:?} is not a host name or an IP address"
        )))
    }
}

/// `troupe certs init`: a new CA in `out` (which must not exist, or be empty), nodes
/// 1..=`nodes`, and the admin client.
pub fn init(out: &Path, nodes: u64, hosts: &[String]) -> Result<Written, CertsError> {
    if nodes == 0 {
        return Err(CertsError::Invalid("--nodes must be at least 1".into()));
    }
    for host in hosts {
        check_host(host)?;
    }
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(true)
    {
        return Err(CertsError::Exists(out.display().to_string()));
    }
    create_private_dir(out)?;
    let ca = Authority::generate("troupe cluster CA", Validity::days(CA_DAYS))?;
    let mut files = Vec::new();
    let mut put = |name: String, contents: &str, secret: bool| -> Result<(), CertsError> {
        let path = out.join(name);
        write_new(&path, contents, secret)?;
        files.push(path);
        Ok(())
    };
    put("ca.crt".into(), ca.cert_pem(), false)?;
    put("ca.key".into(), &ca.key_pem(), true)?;
    let hosts = node_hosts(hosts);
    for id in 1..=nodes {
        let issued = ca.issue(&Identity::Node(id), &hosts, Validity::days(LEAF_DAYS))?;
        put(format!("node-{id}.crt"), &issued.cert_pem, false)?;
        put(format!("node-{id}.key"), &issued.key_pem, true)?;
    }
    let admin = ca.issue_with_role(
        &Identity::Client("admin".into()),
        Some(Role::Admin),
        &[],
        Validity::days(LEAF_DAYS),
    )?;
    put("client-admin.crt".into(), &admin.cert_pem, false)?;
    put("client-admin.key".into(), &admin.key_pem, true)?;
    files.extend(crate::token::init_signing_key(out).map_err(|e| match e {
        crate::token::KeysError::Write(e) => e,
        other => CertsError::Invalid(other.to_string()),
    })?);
    Ok(Written { files })
}

/// `troupe certs add-node`: one more node certificate from the CA in `dir`.
pub fn add_node(dir: &Path, id: u64, hosts: &[String]) -> Result<Written, CertsError> {
    if id == 0 {
        return Err(CertsError::Invalid("--id must be at least 1".into()));
    }
    for host in hosts {
        check_host(host)?;
    }
    issue_into(
        dir,
        &format!("node-{id}"),
        &Identity::Node(id),
        None,
        &node_hosts(hosts),
    )
}

/// Issues a certificate from the CA in `dir` into `<stem>.crt` and `<stem>.key` there, never
/// replacing either.
fn issue_into(
    dir: &Path,
    stem: &str,
    identity: &Identity,
    role: Option<Role>,
    hosts: &[String],
) -> Result<Written, CertsError> {
    let ca = Authority::load(&dir.join("ca.crt"), &dir.join("ca.key"))?;
    let (cert, key) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    for path in [&cert, &key] {
        if path.exists() {
            return Err(CertsError::Exists(path.display().to_string()));
        }
    }
    let issued = ca.issue_with_role(identity, role, hosts, Validity::days(LEAF_DAYS))?;
    write_new(&key, &issued.key_pem, true)?;
    write_new(&cert, &issued.cert_pem, false)?;
    Ok(Written {
        files: vec![cert, key],
    })
}

/// `troupe certs add-client`: a client certificate `client-<name>.crt/.key` granting `role`
/// on the API port.
pub fn add_client(dir: &Path, name: &str, role: Role) -> Result<Written, CertsError> {
    if !valid_client_name(name) {
        return Err(CertsError::Invalid(format!(
            "--name {name:?}: a client name is 1 to 64 of a-z, 0-9, '.', '_' and '-'"
        )));
    }
    issue_into(
        dir,
        &format!("client-{name}"),
        &Identity::Client(name.to_owned()),
        Some(role),
        &[],
    )
}

fn create_private_dir(dir: &Path) -> Result<(), CertsError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| CertsError::Write {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })
}
