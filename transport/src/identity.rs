//! Who a certificate speaks for. troupe certificates name their holder in a URI subject
//! alternative name: `spiffe://troupe/node/<id>` for a node, `spiffe://troupe/client/<name>`
//! for a client (the admin's is `client/admin`). The chain is checked by rustls against the
//! cluster CA; this module only reads the name out of a certificate that already passed.

use std::fmt;

use x509_parser::extensions::GeneralName;

/// The URI prefix every troupe identity starts with.
pub const TRUST_DOMAIN: &str = "spiffe://troupe/";

/// The holder a verified certificate names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A cluster node, by its Raft id.
    Node(u64),
    /// A client (an operator, a tool): never a node.
    Client(String),
}

impl Identity {
    /// The URI subject alternative name that carries this identity.
    pub fn uri(&self) -> String {
        match self {
            Identity::Node(id) => format!("{TRUST_DOMAIN}node/{id}"),
            Identity::Client(name) => format!("{TRUST_DOMAIN}client/{name}"),
        }
    }

    /// Reads an identity URI; anything outside troupe's trust domain is `None`.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(TRUST_DOMAIN)?;
        if let Some(id) = rest.strip_prefix("node/") {
            // Digits only: "+3", " 3" or "03" are not node 3's name.
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) || id.starts_with('0') {
                return None;
            }
            return id.parse().ok().filter(|id| *id > 0).map(Identity::Node);
        }
        let name = rest.strip_prefix("client/")?;
        valid_client_name(name).then(|| Identity::Client(name.to_owned()))
    }

    /// The identity a DER certificate names. A certificate must name exactly one troupe
    /// identity: none, or two different ones, is an error that says which.
    pub fn from_certificate(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
        let names = cert
            .subject_alternative_name()
            .map_err(|e| format!("its subject alternative names cannot be read: {e}"))?;
        let mut found: Option<Identity> = None;
        for name in names.iter().flat_map(|ext| ext.value.general_names.iter()) {
            let GeneralName::URI(uri) = name else {
                continue;
            };
            let Some(identity) = Identity::from_uri(uri) else {
                continue;
            };
            match &found {
                Some(other) if *other != identity => {
                    return Err(format!(
                        "the certificate names two identities ({other} and {identity})"
                    ))
                }
                _ => found = Some(identity),
            }
        }
        found.ok_or_else(|| {
            format!("the certificate names no troupe identity (a URI SAN {TRUST_DOMAIN}node/<id>)")
        })
    }
}

/// The API role a client certificate grants: the URI SAN `spiffe://troupe/role/<role>`.
/// None when the certificate names no role or two different ones.
pub fn role_from_certificate(der: &[u8]) -> Option<crate::token::Role> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let names = cert.subject_alternative_name().ok()??;
    let mut found = None;
    for name in &names.value.general_names {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(role) = uri
            .strip_prefix(TRUST_DOMAIN)
            .and_then(|rest| rest.strip_prefix("role/"))
        else {
            continue;
        };
        let role = crate::token::Role::parse(role)?;
        if found.is_some_and(|other| other != role) {
            return None;
        }
        found = Some(role);
    }
    found
}

/// The URI SAN that grants a client certificate `role`.
pub fn role_uri(role: crate::token::Role) -> String {
    format!("{TRUST_DOMAIN}role/{}", role.label())
}

/// A client name: 1 to 64 of `[a-z0-9._-]`.
pub fn valid_client_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(id) => write!(f, "node {id}"),
            Identity::Client(name) => write!(f, "client {name:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_lookalikes_are_refused() {
        for identity in [
            Identity::Node(1),
            Identity::Node(u64::MAX),
            Identity::Client("admin".into()),
        ] {
            assert_eq!(Identity::from_uri(&identity.uri()), Some(identity));
        }
        for bad in [
            "spiffe://troupe/node/0",
            "spiffe://troupe/node/03",
            "spiffe://troupe/node/+3",
            "spiffe://troupe/node/",
            "spiffe://troupe/node/18446744073709551616",
            "spiffe://other/node/3",
            "spiffe://troupe/client/",
            "spiffe://troupe/client/Admin",
            "spiffe://troupe/client/a/b",
            "spiffe://troupe/admin",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
    }
}
