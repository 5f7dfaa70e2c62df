//! Bearer tokens for the API port: roles, the JWKS that verifies tokens, the signing key that
//! mints them (`troupe token issue`), and the verifier the API gate asks.
//!
//! - Tokens are JWTs signed with EdDSA (Ed25519) or ES256 (P-256). The algorithm is taken
//!   from the verification key, never from the token: `none`, HS* and RSA are refused before
//!   any key is looked at, so a token cannot pick a weaker check.
//! - `iss`, `aud`, `exp` and `nbf` are required, with a small leeway for clock skew, and the
//!   token names its role in a `role` claim.
//! - Keys are found by `kid` in a JWKS file (`jwks.json`), reloaded when it changes, so keys
//!   rotate with overlap: add the new key, mint with it, retire the old one.
//! - The signing key (`jwt-signing.key`, PKCS#8, mode 0600) and `jwks.json` live in the
//!   directory `troupe certs init` makes. A key's `kid` is its RFC 7638 thumbprint.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use sha2::{Digest, Sha256};

use troupe_proto::names::bounded;

use crate::certs::{write_new, CertsError};

/// What a caller may do. Each role includes every role before it: `infer` may read,
/// `operator` may infer, `admin` may do anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Status, lists, watch, history.
    Read,
    /// Inference RPCs (Embed), plus `read`.
    Infer,
    /// Metadata writes: priorities, settings, model register/push/activate/retire, actor
    /// restart; plus `infer`.
    Operator,
    /// Membership and cluster init, and everything else.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Read, Role::Infer, Role::Operator, Role::Admin];

    pub fn label(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Infer => "infer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(label: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.label() == label)
    }

    /// Whether a caller with this role may call an RPC that needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::parse(s).ok_or_else(|| {
            format!("unknown role {s:?}: the roles are read, infer, operator and admin")
        })
    }
}

/// Real tokens are a few hundred bytes; anything past this is refused unread.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The issuer and audience troupe mints and expects unless configured otherwise.
pub const DEFAULT_ISSUER: &str = "troupe";
pub const DEFAULT_AUDIENCE: &str = "troupe-api";
/// Clock skew allowed on `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// File names in a credentials directory.
pub const SIGNING_KEY_FILE: &str = "jwt-signing.key";
pub const JWKS_FILE: &str = "jwks.json";

/// Why a call was not let in. The set is fixed, so it is safe as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No token and no client certificate with a role.
    Missing,
    /// Not a JWT, or not `Bearer <token>`.
    Malformed,
    /// Longer than [`MAX_TOKEN_BYTES`].
    TooLarge,
    /// `none`, HS*, RSA: an algorithm troupe never accepts.
    Algorithm,
    /// A `kid` that is not in the JWKS (or no `kid`).
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongAudience,
    WrongIssuer,
    /// A required claim (`iss`, `aud`, `exp`, `nbf`, `role`) is missing or invalid.
    BadClaims,
    /// A valid credential whose role does not allow the call.
    Forbidden,
}

impl Denial {
    pub const ALL: [Denial; 12] = [
        Denial::Missing,
        Denial::Malformed,
        Denial::TooLarge,
        Denial::Algorithm,
        Denial::UnknownKey,
        Denial::BadSignature,
        Denial::Expired,
        Denial::NotYetValid,
        Denial::WrongAudience,
        Denial::WrongIssuer,
        Denial::BadClaims,
        Denial::Forbidden,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Denial::Missing => "missing",
            Denial::Malformed => "malformed",
            Denial::TooLarge => "too_large",
            Denial::Algorithm => "algorithm",
            Denial::UnknownKey => "unknown_kid",
            Denial::BadSignature => "bad_signature",
            Denial::Expired => "expired",
            Denial::NotYetValid => "not_yet_valid",
            Denial::WrongAudience => "wrong_audience",
            Denial::WrongIssuer => "wrong_issuer",
            Denial::BadClaims => "bad_claims",
            Denial::Forbidden => "forbidden",
        }
    }

    /// `PERMISSION_DENIED` for a caller who proved who it is but may not do this;
    /// `UNAUTHENTICATED` for everything else.
    pub fn code(self) -> tonic::Code {
        match self {
            Denial::Forbidden => tonic::Code::PermissionDenied,
            _ => tonic::Code::Unauthenticated,
        }
    }
}

/// A refused credential: the reason class and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub denial: Denial,
    pub reason: String,
}

impl Refused {
    fn new(denial: Denial, reason: impl Into<String>) -> Self {
        Self {
            denial,
            reason: reason.into(),
        }
    }
}

/// Who is calling, as the API gate established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`, or the client certificate's name.
    pub subject: String,
    pub role: Role,
    pub credential: Credential,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Token,
    Certificate,
    /// The node runs `--insecure`: nobody is checked.
    Insecure,
}

/// One verification key from the JWKS.
struct Key {
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The verification keys by `kid`.
#[derive(Default)]
pub struct Jwks {
    keys: HashMap<String, Key>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} is not a JWKS: {reason}")]
    Invalid { path: String, reason: String },
    #[error(transparent)]
    Write(#[from] CertsError),
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwks").field("kids", &self.kids()).finish()
    }
}

impl Jwks {
    /// Parses a JWKS. Every key must have a unique `kid` and be Ed25519 (OKP) or P-256
    /// (EC); anything else is an error naming the key, not a key silently skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let set: JwkSet = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let kid = jwk
                .common
                .key_id
                .clone()
                .filter(|k| !k.is_empty())
                .ok_or("a key has no \"kid\"")?;
            let algorithm = match &jwk.algorithm {
                AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                    Algorithm::EdDSA
                }
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                _ => {
                    return Err(format!(
                        "key {kid:?} is neither Ed25519 nor P-256: troupe verifies EdDSA and ES256 only"
                    ))
                }
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid:?}: {e}"))?;
            if keys.insert(kid.clone(), Key { algorithm, key }).is_some() {
                return Err(format!("two keys have the kid {kid:?}"));
            }
        }
        Ok(Self { keys })
    }

    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeysError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text).map_err(|reason| KeysError::Invalid {
            path: path.display().to_string(),
            reason,
        })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn kids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self.keys.keys().cloned().collect();
        kids.sort();
        kids
    }
}

/// What a token must say to be accepted.
#[derive(Debug, Clone)]
pub struct TokenPolicy {
    pub issuer: String,
    pub audience: String,
    pub leeway: Duration,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        Self {
            issuer: DEFAULT_ISSUER.into(),
            audience: DEFAULT_AUDIENCE.into(),
            leeway: DEFAULT_LEEWAY,
        }
    }
}

/// The claims troupe reads after the signature and the standard claims are checked.
#[derive(serde::Deserialize)]
struct RoleClaims {
    #[serde(default)]
    sub: Option<String>,
    role: String,
    exp: u64,
}

/// Verified tokens kept so a client's token is not verified again on every call.
const CACHE_ENTRIES: usize = 4096;

/// Verifies bearer tokens against the current JWKS.
pub struct Verifier {
    policy: TokenPolicy,
    keys: RwLock<Arc<Jwks>>,
    /// sha256(token) -> (principal, exp). Cleared whenever the keys change, so a retired key
    /// stops working at once.
    cache: Mutex<HashMap<[u8; 32], (Principal, u64)>>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Verifier {
    pub fn new(policy: TokenPolicy, keys: Jwks) -> Self {
        Self {
            policy,
            keys: RwLock::new(Arc::new(keys)),
            cache: Mutex::new(HashMap::new()),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        }
    }

    pub fn policy(&self) -> &TokenPolicy {
        &self.policy
    }

    /// Swaps in new keys; tokens verified with the old ones are verified again.
    pub fn replace_keys(&self, keys: Jwks) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn keys(&self) -> Arc<Jwks> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `(ok, failed)` JWKS reloads since start.
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }

    /// The principal a token proves, or why it proves nothing.
    pub fn verify(&self, token: &str) -> Result<Principal, Refused> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refused::new(
                Denial::TooLarge,
                format!(
                    "the token is {} bytes; the limit is {MAX_TOKEN_BYTES}",
                    token.len()
                ),
            ));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = now_secs();
        let leeway = self.policy.leeway.as_secs();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((principal, exp)) = cache.get(&digest) {
                if now <= exp.saturating_add(leeway) {
                    return Ok(principal.clone());
                }
                cache.remove(&digest);
            }
        }
        let (principal, exp) = self.verify_uncached(token)?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(digest, (principal.clone(), exp));
        Ok(principal)
    }

    fn verify_uncached(&self, token: &str) -> Result<(Principal, u64), Refused> {
        let header = token_header(token)?;
        let alg = header
            .get("alg")
            .and_then(|a| a.as_str())
            .ok_or_else(|| Refused::new(Denial::Malformed, "the token header has no \"alg\""))?;
        if alg != "EdDSA" && alg != "ES256" {
            return Err(Refused::new(
                Denial::Algorithm,
                format!(
                    "algorithm {} is never accepted: tokens must be signed with EdDSA or ES256 (`troupe token issue`)",
                    bounded(alg)
                ),
            ));
        }
        let kid = header.get("kid").and_then(|k| k.as_str()).ok_or_else(|| {
            Refused::new(
                Denial::UnknownKey,
                "the token names no key (\"kid\"): mint it with `troupe token issue`",
            )
        })?;
        let keys = self.keys();
        let Some(key) = keys.keys.get(kid) else {
            return Err(Refused::new(
                Denial::UnknownKey,
                format!(
                    "unknown key id {}: no key in this node's jwks.json has it (retired, or the JWKS was not copied to this node)",
                    bounded(kid)
                ),
            ));
        };
        let token_alg = if alg == "EdDSA" {
            Algorithm::EdDSA
        } else {
            Algorithm::ES256
        };
        if token_alg != key.algorithm {
            return Err(Refused::new(
                Denial::Algorithm,
                format!(
                    "the token says {alg}, but key {} is a {:?} key",
                    bounded(kid),
                    key.algorithm
                ),
            ));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.set_issuer(&[&self.policy.issuer]);
        validation.set_audience(&[&self.policy.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.policy.leeway.as_secs();
        let data = jsonwebtoken::decode::<RoleClaims>(token, &key.key, &validation)
            .map_err(|e| self.claim_error(e))?;
        let claims = data.claims;
        let role = Role::parse(&claims.role).ok_or_else(|| {
            Refused::new(
                Denial::BadClaims,
                format!(
                    "the token's role {} is not one of read, infer, operator, admin",
                    bounded(&claims.role)
                ),
            )
        })?;
        let subject = claims.sub.unwrap_or_default();
        let subject = if subject.len() > 128 {
            subject[..subject.floor_char_boundary(128)].to_owned()
        } else {
            subject
        };
        Ok((
            Principal {
                subject,
                role,
                credential: Credential::Token,
            },
            claims.exp,
        ))
    }

    fn claim_error(&self, error: jsonwebtoken::errors::Error) -> Refused {
        use jsonwebtoken::errors::ErrorKind as K;
        match error.kind() {
            K::InvalidSignature => Refused::new(
                Denial::BadSignature,
                "the token's signature does not verify",
            ),
            K::ExpiredSignature => Refused::new(
                Denial::Expired,
                "the token has expired: mint a new one (`troupe token issue`)",
            ),
            K::ImmatureSignature => Refused::new(
                Denial::NotYetValid,
                "the token is not valid yet (its \"nbf\" is in the future: check the clocks)",
            ),
            K::InvalidAudience => Refused::new(
                Denial::WrongAudience,
                format!(
                    "the token is for another audience: this cluster accepts aud {:?}",
                    self.policy.audience
                ),
            ),
            K::InvalidIssuer => Refused::new(
                Denial::WrongIssuer,
                format!(
                    "the token is from another issuer: this cluster accepts iss {:?}",
                    self.policy.issuer
                ),
            ),
            K::MissingRequiredClaim(claim) => Refused::new(
                Denial::BadClaims,
                format!(
                    "the token has no {} claim: troupe requires iss, aud, exp and nbf",
                    bounded(claim)
                ),
            ),
            K::Json(_) => Refused::new(
                Denial::BadClaims,
                "the token's claims are not what troupe expects (iss, aud, exp, nbf as numbers, a role)",
            ),
            K::InvalidAlgorithm | K::InvalidAlgorithmName => Refused::new(
                Denial::Algorithm,
                "the token's algorithm does not match its key",
            ),
            _ => Refused::new(Denial::Malformed, "the token is not a well-formed JWT"),
        }
    }
}

/// The JOSE header of a compact JWT, without trusting any of it yet.
fn token_header(token: &str) -> Result<serde_json::Map<String, serde_json::Value>, Refused> {
    let malformed = || {
        Refused::new(
            Denial::Malformed,
            "the token is not a JWT (three base64url parts separated by dots)",
        )
    };
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let bytes = B64URL.decode(header).map_err(|_| malformed())?;
    serde_json::from_slice(&bytes).map_err(|_| malformed())
}

/// A key that signs tokens.
pub struct SigningKey {
    pub kid: String,
    key: EncodingKey,
    /// The public half, as a JWK for `jwks.json`.
    pub jwk: serde_json::Value,
}

impl SigningKey {
    /// A new Ed25519 key, and its PKCS#8 PEM.
    pub fn generate() -> Result<(Self, String), CertsError> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        let pem = pair.serialize_pem();
        Ok((Self::from_pair(&pair, &pem)?, pem))
    }

    /// The key in `path` (an Ed25519 PKCS#8 PEM).
    pub fn load(path: &Path) -> Result<Self, CertsError> {
        let pem = std::fs::read_to_string(path).map_err(|e| CertsError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let pair = rcgen::KeyPair::from_pem(&pem).map_err(|e| {
            CertsError::Invalid(format!("{} is not a private key: {e}", path.display()))
        })?;
        Self::from_pair(&pair, &pem)
    }

    fn from_pair(pair: &rcgen::KeyPair, pem: &str) -> Result<Self, CertsError> {
        if !pair.is_compatible(&rcgen::PKCS_ED25519) {
            return Err(CertsError::Invalid(
                "the token signing key must be Ed25519".into(),
            ));
        }
        let x = B64URL.encode(pair.public_key_raw());
        // RFC 7638: the thumbprint of the required members in lexicographic order.
        let thumbprint = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
        let kid = B64URL.encode(Sha256::digest(thumbprint.as_bytes()));
        let key = EncodingKey::from_ed_pem(pem.as_bytes())
            .map_err(|e| CertsError::Invalid(format!("the signing key cannot be used: {e}")))?;
        let jwk = serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig",
        });
        Ok(Self { kid, key, jwk })
    }

    /// A token for `subject` with `role`, valid from now for `ttl`.
    pub fn issue(
        &self,
        policy: &TokenPolicy,
        subject: &str,
        role: Role,
        ttl: Duration,
    ) -> Result<String, CertsError> {
        let now = now_secs();
        let claims = serde_json::json!({
            "iss": policy.issuer,
            "aud": policy.audience,
            "sub": subject,
            "role": role.label(),
            "iat": now,
            "nbf": now,
            "exp": now + ttl.as_secs(),
            "jti": hex::encode(&Sha256::digest(format!("{}{now}{subject}", std::process::id()))[..8]),
        });
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| CertsError::Invalid(format!("cannot sign the token: {e}")))
    }
}

/// The JWKS in `dir` as JSON values (empty when the file does not exist).
fn read_jwks_values(path: &Path) -> Result<Vec<serde_json::Value>, KeysError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| KeysError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Jwks::parse(&text).map_err(|reason| KeysError::Invalid {
        path: path.display().to_string(),
        reason,
    })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| KeysError::Invalid {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(value["keys"].as_array().cloned().unwrap_or_default())
}

/// Replaces `path` in one step (a new file renamed over it), so a node reloading it never
/// reads half a file.
fn replace_file(path: &Path, contents: &str) -> Result<(), KeysError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, contents, false)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        KeysError::Write(CertsError::Write {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    })
}

fn write_jwks(path: &Path, keys: Vec<serde_json::Value>) -> Result<(), KeysError> {
    let text = serde_json::to_string_pretty(&serde_json::json!({ "keys": keys })).map_err(|e| {
        KeysError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        }
    })?;
    replace_file(path, &(text + "\n"))
}

/// A new signing key in `dir` (which must not have one), its public key added to the JWKS.
pub fn init_signing_key(dir: &Path) -> Result<Vec<PathBuf>, KeysError> {
    let key_path = dir.join(SIGNING_KEY_FILE);
    let jwks_path = dir.join(JWKS_FILE);
    let (key, pem) = SigningKey::generate()?;
    write_new(&key_path, &pem, true)?;
    let mut keys = read_jwks_values(&jwks_path)?;
    keys.push(key.jwk.clone());
    write_jwks(&jwks_path, keys)?;
    Ok(vec![key_path, jwks_path])
}

/// `troupe token rotate`: a new signing key replaces the one in `dir`. Both public keys stay
/// in the JWKS, so tokens already issued keep working until the old key is retired.
/// Returns `(old kid, new kid)`.
pub fn rotate_signing_key(dir: &Path) -> Result<(String, String), KeysError> {
    let key_path = dir.join(SIGNING_KEY_FILE);
    let jwks_path = dir.join(JWKS_FILE);
    let old = SigningKey::load(&key_path)?;
    let (new, pem) = SigningKey::generate()?;
    let mut keys = read_jwks_values(&jwks_path)?;
    keys.push(new.jwk.clone());
    // The JWKS first: a node must know the new key before any token signed with it exists.
    write_jwks(&jwks_path, keys)?;
    let tmp = dir.join(format!("{SIGNING_KEY_FILE}.new"));
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, &pem, true)?;
    std::fs::rename(&tmp, &key_path).map_err(|e| {
        KeysError::Write(CertsError::Write {
            path: key_path.display().to_string(),
            reason: e.to_string(),
        })
    })?;
    Ok((old.kid, new.kid))
}

/// `troupe token retire`: removes `kid` from the JWKS; tokens signed with it stop working on
/// every node once it reloads. The current signing key cannot be retired.
pub fn retire_key(dir: &Path, kid: &str) -> Result<(), KeysError> {
    let jwks_path = dir.join(JWKS_FILE);
    let current = SigningKey::load(&dir.join(SIGNING_KEY_FILE))?;
    if current.kid == kid {
        return Err(KeysError::Write(CertsError::Invalid(format!(
            "{kid} is the current signing key: rotate first (`troupe token rotate`), then retire the old key"
        ))));
    }
    let mut keys = read_jwks_values(&jwks_path)?;
    let before = keys.len();
    keys.retain(|k| k["kid"].as_str() != Some(kid));
    if keys.len() == before {
        return Err(KeysError::Write(CertsError::Invalid(format!(
            "{} holds no key {kid:?}",
            jwks_path.display()
        ))));
    }
    write_jwks(&jwks_path, keys)
}

/// Loads `path` into `verifier` when it changes (checked every `interval`, and at once when
/// `now` is notified). A file that cannot be read or parsed keeps the old keys and is logged.
pub async fn jwks_reloader(
    verifier: Arc<Verifier>,
    path: PathBuf,
    interval: Duration,
    now: Arc<tokio::sync::Notify>,
) {
    let stamp = |path: &Path| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = now.notified() => {}
        }
        let current = stamp(&path);
        if current == seen {
            continue;
        }
        seen = current;
        match Jwks::load(&path) {
            Ok(keys) => {
                tracing::info!(path = %path.display(), kids = ?keys.kids(), "reloaded the token verification keys");
                verifier.replace_keys(keys);
                verifier.reloads_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::error!(%error, "cannot reload the token verification keys; the old keys stay in use");
                verifier.reloads_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_dir() -> (tempfile::TempDir, SigningKey, Verifier) {
        let dir = tempfile::tempdir().unwrap();
        init_signing_key(dir.path()).unwrap();
        let key = SigningKey::load(&dir.path().join(SIGNING_KEY_FILE)).unwrap();
        let jwks = Jwks::load(&dir.path().join(JWKS_FILE)).unwrap();
        (dir, key, Verifier::new(TokenPolicy::default(), jwks))
    }

    /// A token for a minute with the default policy.
    fn mint(key: &SigningKey, subject: &str, role: Role) -> String {
        key.issue(
            &TokenPolicy::default(),
            subject,
            role,
            Duration::from_secs(60),
        )
        .unwrap()
    }

    fn unsigned(header: &str, claims: &str) -> String {
        format!(
            "{}.{}.{}",
            B64URL.encode(header),
            B64URL.encode(claims),
            B64URL.encode(b"sig")
        )
    }

    #[test]
    fn a_minted_token_verifies_with_its_role() {
        let (_dir, key, verifier) = keys_dir();
        let token = mint(&key, "ci", Role::Operator);
        let principal = verifier.verify(&token).unwrap();
        assert_eq!(principal.role, Role::Operator);
        assert_eq!(principal.subject, "ci");
        // Cached the second time, same answer.
        assert_eq!(verifier.verify(&token).unwrap(), principal);
    }

    #[test]
    fn hostile_tokens_are_refused_with_their_reason() {
        let (_dir, key, verifier) = keys_dir();
        let none = unsigned(
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"role":"admin","iss":"troupe","aud":"troupe-api","exp":99999999999,"nbf":0}"#,
        );
        assert_eq!(
            verifier.verify(&none).unwrap_err().denial,
            Denial::Algorithm
        );
        let hs = unsigned(
            &format!(r#"{{"alg":"HS256","kid":"{}"}}"#, key.kid),
            r#"{"role":"admin"}"#,
        );
        assert_eq!(verifier.verify(&hs).unwrap_err().denial, Denial::Algorithm);
        let unknown = unsigned(r#"{"alg":"EdDSA","kid":"nope"}"#, "{}");
        assert_eq!(
            verifier.verify(&unknown).unwrap_err().denial,
            Denial::UnknownKey
        );
        assert_eq!(
            verifier.verify("garbage").unwrap_err().denial,
            Denial::Malformed
        );
        let big = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(verifier.verify(&big).unwrap_err().denial, Denial::TooLarge);
        let token = mint(&key, "x", Role::Read);
        let mut tampered = token.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(
            verifier.verify(&tampered).unwrap_err().denial,
            Denial::BadSignature
        );
        let other = TokenPolicy {
            audience: "other".into(),
            ..TokenPolicy::default()
        };
        let wrong_aud = key
            .issue(&other, "x", Role::Read, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            verifier.verify(&wrong_aud).unwrap_err().denial,
            Denial::WrongAudience
        );
    }

    #[test]
    fn replacing_the_keys_drops_cached_tokens() {
        let (_dir, key, verifier) = keys_dir();
        let token = mint(&key, "x", Role::Read);
        verifier.verify(&token).unwrap();
        verifier.replace_keys(Jwks::default());
        assert_eq!(
            verifier.verify(&token).unwrap_err().denial,
            Denial::UnknownKey
        );
    }

    #[test]
    fn rotation_keeps_the_old_key_until_it_is_retired() {
        let dir = tempfile::tempdir().unwrap();
        init_signing_key(dir.path()).unwrap();
        let (old, new) = rotate_signing_key(dir.path()).unwrap();
        assert_ne!(old, new);
        let jwks = Jwks::load(&dir.path().join(JWKS_FILE)).unwrap();
        assert_eq!(jwks.len(), 2);
        assert!(retire_key(dir.path(), &new).is_err(), "the current key");
        retire_key(dir.path(), &old).unwrap();
        let jwks = Jwks::load(&dir.path().join(JWKS_FILE)).unwrap();
        assert_eq!(jwks.kids(), vec![new]);
    }

    #[test]
    fn a_jwks_with_an_rsa_or_unnamed_key_is_an_error() {
        assert!(Jwks::parse(r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#)
            .unwrap_err()
            .contains("kid"));
        assert!(Jwks::parse(r#"{"keys":[{"kty":"oct","k":"AAAA","kid":"h"}]}"#).is_err());
        assert!(Jwks::parse("not json").is_err());
    }
}
