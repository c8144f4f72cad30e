//! Cluster CA, node identities and mutual TLS for the agents' QUIC links.
//!
//! Every agent holds a certificate for its node, issued by a cluster CA the
//! operator manages; the node name is the certificate's only DNS SAN (and its
//! CN). Servers require and verify a client certificate chained to that CA,
//! clients verify that the server's certificate names the node they dialled,
//! so both ends know which node they talk to (see [`peer_node`]).
//!
//! On top of the chain and the name, both ends check the peer's certificate
//! fingerprint against [`PeerPins`] (fed from `spec.peers`), and the
//! certificate presented is a [`LiveIdentity`] that can be swapped while
//! the endpoint runs (renewal of the short-lived node certificates, see
//! [`NODE_CERT_VALIDITY`]).
//!
//! All rustls configs are built with the `ring` provider explicitly, so
//! nothing depends on a process-wide default provider being installed.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType, SerialNumber,
};
use rustls::client::ResolvesClientCert;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// ALPN protocol of the agents' QUIC links.
pub const ALPN: &[u8] = b"peerfill/1";

/// Validity of node certificates: short, so a leaked node key is useful
/// for a day at most. Agents renew when a third of it is left
/// (`k8s::identity::renewal_due`), i.e. after ~16 h.
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Back-dating of a node certificate's `notBefore`, for clock skew between
/// the operator and the nodes.
pub const NODE_CERT_BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Validity of the cluster CA certificate.
pub const CA_CERT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Back-dating of the CA's `notBefore`, to tolerate clock skew between nodes.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid node name {name:?}: {reason}")]
    InvalidNodeName { name: String, reason: &'static str },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("TLS config unusable for QUIC: {0}")]
    Quic(String),
    #[error("no {what} found in {source_name}")]
    MissingPem {
        what: &'static str,
        source_name: String,
    },
    #[error("invalid PEM in {source_name}: {reason}")]
    InvalidPem { source_name: String, reason: String },
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    #[error("the CSR names {found:?}, but it must name exactly the node {expected:?}")]
    CsrNodeMismatch {
        expected: String,
        found: Vec<String>,
    },
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("node {node} presented certificate {got}, but its pinned certificate is {pinned:?}")]
    PinMismatch {
        node: String,
        got: String,
        pinned: Vec<String>,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks `name` is a DNS-1123 subdomain, which Kubernetes node names are,
/// and which TLS can carry as a DNS SAN and server name.
pub fn validate_node_name(name: &str) -> Result<(), TlsError> {
    let bad = |reason| TlsError::InvalidNodeName {
        name: name.chars().take(300).collect(),
        reason,
    };
    if name.is_empty() || name.len() > 253 {
        return Err(bad("must be 1 to 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each dot-separated label must be 1 to 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad(
                "only lowercase letters, digits, '-' and '.' are allowed",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("labels must start and end with a letter or digit"));
        }
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(bad("must be a DNS name, not an IP address"));
    }
    ServerName::try_from(name).map_err(|_| bad("not a valid TLS server name"))?;
    Ok(())
}

fn node_params(node: &str) -> Result<CertificateParams, TlsError> {
    validate_node_name(node)?;
    let now = time::OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName(node.try_into()?)];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    params.not_before = now - NODE_CERT_BACKDATE;
    params.not_after = now + NODE_CERT_VALIDITY;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    Ok(params)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and non-zero as DER INTEGER serials must be.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

/// The cluster CA. Only the operator holds its key; agents get certificates.
pub struct ClusterCa {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A fresh self-signed CA (ECDSA P-256, 10 years, path length 0).
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let now = time::OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "peerfill");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + CA_CERT_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and private key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        // Parse once to fail early on garbage and to reject a non-CA cert.
        let der = first_cert(cert_pem, "CA certificate")?;
        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| TlsError::InvalidCertificate(format!("CA certificate: {e}")))?;
        if !x509.is_ca() {
            return Err(TlsError::InvalidCertificate(
                "the CA certificate is not a CA (basicConstraints cA is false)".into(),
            ));
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(TlsError::InvalidCertificate(
                "the CA key does not match the CA certificate".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(ClusterCa {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A fresh key and certificate for `node` (SAN DNS + CN = node,
    /// [`NODE_CERT_VALIDITY`], EKU serverAuth + clientAuth).
    pub fn issue(&self, node: &str) -> Result<NodeIdentity, TlsError> {
        let params = node_params(node)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(NodeIdentity::new(
            node.to_string(),
            cert.pem(),
            key.serialize_pem(),
            self.cert_pem.clone(),
        ))
    }

    /// Signs a node's CSR, refusing one whose subject CN or SANs name
    /// anything but exactly `expected_node`. Only the CSR's public key is
    /// used: validity, key usages and constraints are set here, never taken
    /// from the request.
    pub fn sign_csr(&self, csr_pem: &str, expected_node: &str) -> Result<String, TlsError> {
        validate_node_name(expected_node)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut names: Vec<String> = Vec::new();
        let mut only_dns = true;
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::DnsName(n) => names.push(n.as_str().to_string()),
                other => {
                    only_dns = false;
                    names.push(format!("{other:?}"));
                }
            }
        }
        let mut cn_ok = true;
        for (ty, value) in csr.params.distinguished_name.iter() {
            if *ty == DnType::CommonName {
                let cn = dn_value_str(value);
                if cn.as_deref() != Some(expected_node) {
                    cn_ok = false;
                    names.push(format!(
                        "CN={}",
                        cn.unwrap_or_else(|| "<unreadable>".into())
                    ));
                }
            }
        }
        if !only_dns || !cn_ok || names != [expected_node] {
            return Err(TlsError::CsrNodeMismatch {
                expected: expected_node.to_string(),
                found: names,
            });
        }
        let params = node_params(expected_node)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.pem())
    }
}

fn dn_value_str(v: &DnValue) -> Option<String> {
    match v {
        DnValue::Utf8String(s) => Some(s.clone()),
        DnValue::PrintableString(s) => Some(s.as_str().to_string()),
        DnValue::Ia5String(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// A CSR and its new private key for `node` (both PEM), for the
/// request/approve flow in which the CA key never leaves the operator.
pub fn generate_csr(node: &str) -> Result<(String, String), TlsError> {
    validate_node_name(node)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName(node.try_into()?)];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    let key = KeyPair::generate()?;
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// A node's certificate, key and the CA certificate that roots the cluster,
/// with the TLS state shared by the configs built from it: the peer pins
/// and the live (swappable) certificate. Clones share that state.
#[derive(Clone)]
pub struct NodeIdentity {
    pub node: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    /// Checked by [`server_config`] and [`client_config`]; feed it from
    /// `spec.peers` ([`PeerPins::set`]).
    pub pins: PeerPins,
    /// What the configs present; [`NodeIdentity::renew`] swaps it.
    pub live: LiveIdentity,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn read_file(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io {
        op: "reading",
        path: path.to_path_buf(),
        source,
    })
}

fn parse_certs(pem: &str, source_name: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::InvalidPem {
            source_name: source_name.to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::MissingPem {
            what: "certificate",
            source_name: source_name.to_string(),
        });
    }
    Ok(certs)
}

fn first_cert(pem: &str, source_name: &str) -> Result<CertificateDer<'static>, TlsError> {
    let mut certs = parse_certs(pem, source_name)?;
    Ok(certs.swap_remove(0))
}

fn parse_key(pem: &str, source_name: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| TlsError::InvalidPem {
            source_name: source_name.to_string(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| TlsError::MissingPem {
            what: "private key",
            source_name: source_name.to_string(),
        })
}

/// The node name a certificate was issued to: its single DNS SAN.
pub fn node_name_of_cert(der: &[u8]) -> Result<String, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::InvalidCertificate(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::InvalidCertificate(format!("subjectAltName: {e}")))?
        .ok_or_else(|| TlsError::InvalidCertificate("no subjectAltName".into()))?;
    let dns: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(s) => Some(*s),
            _ => None,
        })
        .collect();
    match dns.as_slice() {
        [one] => Ok((*one).to_string()),
        _ => Err(TlsError::InvalidCertificate(format!(
            "expected exactly one DNS name in subjectAltName, found {}",
            dns.len()
        ))),
    }
}

impl NodeIdentity {
    /// Loads an identity from PEM files (the node name is read from the
    /// certificate), checking that they parse.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let cert_pem = read_file(cert)?;
        let key_pem = read_file(key)?;
        let ca_pem = read_file(ca)?;
        let leaf = first_cert(&cert_pem, &cert.display().to_string())?;
        parse_key(&key_pem, &key.display().to_string())?;
        parse_certs(&ca_pem, &ca.display().to_string())?;
        let node = node_name_of_cert(leaf.as_ref())?;
        Ok(NodeIdentity::new(node, cert_pem, key_pem, ca_pem))
    }

    /// An identity from its parts, with no pins and nothing live yet.
    pub fn new(node: String, cert_pem: String, key_pem: String, ca_pem: String) -> NodeIdentity {
        NodeIdentity {
            node,
            cert_pem,
            key_pem,
            ca_pem,
            pins: PeerPins::new(),
            live: LiveIdentity::default(),
        }
    }

    /// Swaps the certificate presented by every config built from this
    /// identity (or a clone of it) to `renewed`'s, without touching live
    /// connections: new handshakes, accepted or dialled, use it. `renewed`
    /// must be for the same node.
    pub fn renew(&mut self, renewed: &NodeIdentity) -> Result<(), TlsError> {
        if renewed.node != self.node {
            return Err(TlsError::InvalidCertificate(format!(
                "the renewed certificate is for node {}, not {}",
                renewed.node, self.node
            )));
        }
        self.live.set(renewed)?;
        self.cert_pem = renewed.cert_pem.clone();
        self.key_pem = renewed.key_pem.clone();
        self.ca_pem = renewed.ca_pem.clone();
        Ok(())
    }

    /// `sha256:<hex>` of this identity's certificate.
    pub fn fingerprint(&self) -> Result<String, TlsError> {
        Ok(cert_fingerprint(
            first_cert(&self.cert_pem, "node certificate")?.as_ref(),
        ))
    }

    /// Writes `tls.crt`, `tls.key` (mode 0600) and `ca.crt` into `dir`, each
    /// replaced atomically.
    pub fn write(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
            op: "creating directory",
            path: dir.to_path_buf(),
            source,
        })?;
        write_atomic(&dir.join("tls.crt"), self.cert_pem.as_bytes(), 0o644)?;
        write_atomic(&dir.join("tls.key"), self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&dir.join("ca.crt"), self.ca_pem.as_bytes(), 0o644)
    }

    fn chain_and_key(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        Ok((
            parse_certs(&self.cert_pem, "node certificate")?,
            parse_key(&self.key_pem, "node key")?,
        ))
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in parse_certs(&self.ca_pem, "CA certificate")? {
            roots.add(ca)?;
        }
        Ok(Arc::new(roots))
    }
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let io = |op, source| TlsError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    // Remove a stale temp file so its (maybe wider) mode is not inherited.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io("creating", e))?;
    f.write_all(data).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming", e))
}

/// `sha256:<hex>` of a certificate's DER: the form of
/// `certificateFingerprint` in NodeFill status and `spec.peers`.
pub fn cert_fingerprint(der: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(der)))
}

/// Certificate fingerprints pinned per node (from `spec.peers[]
/// .certificateFingerprint`), checked by both QUIC verifiers on top of the
/// CA chain and the node name: a node with pins is accepted only with one
/// of them; a node without any is accepted on the chain alone (its
/// fingerprint is not published yet). Cheap to clone; clones share the set.
#[derive(Debug, Clone, Default)]
pub struct PeerPins {
    inner: Arc<RwLock<HashMap<String, BTreeSet<String>>>>,
}

impl PeerPins {
    pub fn new() -> PeerPins {
        PeerPins::default()
    }

    /// Replaces every pin: `(node, fingerprint)` pairs; a node may have
    /// several (e.g. the old and the new certificate around a renewal).
    pub fn set<I, N, F>(&self, pins: I)
    where
        I: IntoIterator<Item = (N, F)>,
        N: Into<String>,
        F: AsRef<str>,
    {
        let mut map: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (node, fp) in pins {
            map.entry(node.into())
                .or_default()
                .insert(fp.as_ref().trim().to_ascii_lowercase());
        }
        *self.inner.write().unwrap_or_else(PoisonError::into_inner) = map;
    }

    /// The fingerprints pinned for `node`, if any.
    pub fn pinned(&self, node: &str) -> Option<BTreeSet<String>> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            .filter(|s| !s.is_empty())
            .cloned()
    }

    /// Whether the certificate `der` may stand for `node`.
    pub fn check(&self, node: &str, der: &[u8]) -> Result<(), TlsError> {
        let Some(allowed) = self.pinned(node) else {
            return Ok(());
        };
        let got = cert_fingerprint(der);
        if allowed.contains(&got) {
            Ok(())
        } else {
            Err(TlsError::PinMismatch {
                node: node.to_string(),
                got,
                pinned: allowed.into_iter().collect(),
            })
        }
    }

    /// For the QUIC verifiers: whether the certificate `der` may stand for
    /// the node it names, as a rustls error when not.
    fn check_cert(&self, der: &[u8]) -> Result<(), rustls::Error> {
        let node = node_name_of_cert(der).map_err(pin_error)?;
        self.check(&node, der).map_err(pin_error)
    }
}

fn pin_error(e: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

/// Server side: the CA chain (webpki), then the client's pin.
#[derive(Debug)]
struct PinnedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    pins: PeerPins,
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.pins.check_cert(end_entity.as_ref())?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
}

/// Client side: the CA chain and the dialled name (webpki), then the pin of
/// the dialled node.
#[derive(Debug)]
struct PinnedServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pins: PeerPins,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        // webpki checked the certificate names `server_name`; the pin is
        // that node's.
        self.pins.check_cert(end_entity.as_ref())?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The certificate and key this agent presents, swappable while the QUIC
/// endpoint runs: the configs built by [`server_config`] and
/// [`client_config`] resolve it on every handshake, so after
/// [`LiveIdentity::set`] new connections (accepted and dialled) use the new
/// certificate while live ones continue untouched. Cheap to clone.
#[derive(Clone, Default)]
pub struct LiveIdentity {
    current: Arc<RwLock<Option<Arc<CertifiedKey>>>>,
}

impl std::fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveIdentity").finish_non_exhaustive()
    }
}

impl LiveIdentity {
    /// Presents `id`'s certificate from now on (it must be for the same
    /// node and CA: peers verify it against the same roots).
    pub fn set(&self, id: &NodeIdentity) -> Result<(), TlsError> {
        let (chain, key) = id.chain_and_key()?;
        let ck = CertifiedKey::from_der(chain, key, &provider())?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(ck));
        Ok(())
    }

    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `sha256:<hex>` of the certificate presented now.
    pub fn fingerprint(&self) -> Option<String> {
        self.get()
            .and_then(|ck| ck.cert.first().map(|c| cert_fingerprint(c.as_ref())))
    }

    fn set_if_empty(&self, id: &NodeIdentity) -> Result<(), TlsError> {
        if self.get().is_none() {
            self.set(id)?;
        }
        Ok(())
    }
}

impl ResolvesServerCert for LiveIdentity {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl ResolvesClientCert for LiveIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

/// Unread bytes a peer may send us on one connection (QUIC flow control).
/// Pieces are only sent when requested, so what is really buffered is bounded
/// by the download permits; this caps a misbehaving peer too: at most
/// 64 peers x this, and it still lets one connection run at ~1.6 GB/s at a
/// 5 ms RTT.
pub const CONN_RECEIVE_WINDOW: u32 = 8 << 20;

/// Unread bytes of one stream (one piece request): a piece streams at full
/// speed with a window smaller than the piece, the window moves as we read.
pub const STREAM_RECEIVE_WINDOW: u32 = 4 << 20;

/// Bytes written but not yet acknowledged that quinn keeps per connection.
/// The piece buffers behind them are the upload slots' (shared, not copied).
pub const CONN_SEND_WINDOW: u64 = 8 << 20;

/// Largest UDP payload MTU discovery probes for: jumbo frames and loopback
/// carry it (far fewer packets per byte, and per-packet work dominates the
/// CPU per byte); on a 1500-byte path the probes fail and the connection
/// stays at 1472. Discovery is bounded by the payload size the peer's
/// endpoint accepts too, so both ends need [`endpoint_config`].
///
/// Why not 8952 (a 9000-byte jumbo frame): quinn sends up to 10 datagrams
/// in one GSO `sendmsg`, and the kernel refuses a batch over 64 KiB with
/// `EMSGSIZE`, which quinn-udp drops silently. At 8952 every full batch was
/// lost, its black-hole detector then fell back to 1200-byte datagrams for a
/// minute (seen on the netbench with 9000-byte links). 10 × 6550 fits in
/// the 65,507 bytes an IPv4 UDP send may carry.
pub const MTU_UPPER_BOUND: u16 = 6550;

/// Endpoint settings: accept UDP payloads up to [`MTU_UPPER_BOUND`]. quinn's
/// default (1472) is also what an endpoint advertises as the largest payload
/// it takes, which caps the peer's MTU discovery: without this, no
/// connection ever used more than 1472-byte datagrams, jumbo frames or not.
/// Cost: the endpoint's receive buffer grows with it (quinn allocates
/// payload × GRO segments × batch, zeroed lazily; the kernel fills at most
/// 64 KiB per GRO message, so the memory touched stays ~2 MiB).
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut cfg = quinn::EndpointConfig::default();
    // 6550 is within quinn's accepted range (1200..=65527), so this cannot fail.
    let _ = cfg.max_udp_payload_size(MTU_UPPER_BOUND);
    cfg
}

/// Packets a peer may receive before it must acknowledge (QUIC ACK frequency
/// extension; quinn's default acknowledges every second packet). Measured on
/// the netbench, N = 16 at 20 Mbit/s: context switches per agent 1,600/s →
/// 1,320/s.
pub const ACK_ELICITING_THRESHOLD: u32 = 9;

/// QUIC transport settings shared by both ends: keep-alives so idle peer
/// links survive NAT/conntrack, a 30 s idle timeout so dead peers are noticed,
/// receive windows large enough that a piece streams at full speed yet
/// bounded per connection (memory: see the window constants), MTU discovery
/// up to [`MTU_UPPER_BOUND`], an ACK every [`ACK_ELICITING_THRESHOLD`] + 1
/// packets, no unreliable datagrams (unused).
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    // 30 s fits in a VarInt of milliseconds, so this conversion cannot fail.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(30)).ok());
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_RECEIVE_WINDOW));
    t.receive_window(quinn::VarInt::from_u32(CONN_RECEIVE_WINDOW));
    t.send_window(CONN_SEND_WINDOW);
    t.datagram_receive_buffer_size(None);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(256));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(256));
    // Fewer ACKs: each one is a packet the sender must receive and wake up
    // for (per-packet work dominates the CPU per byte at cluster link rates)
    // and wire bytes the pieces do not get. Congestion control still hears
    // of loss at once (the reordering threshold stays at quinn's default).
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    t.ack_frequency_config(Some(ack));
    t
}

/// Server side: requires a client certificate chained to the cluster CA
/// (clients without one fail the handshake before any stream opens) and,
/// if its node has pins in `id.pins`, one of them. Presents `id.live`
/// (initialised to `id`'s certificate if empty).
pub fn server_config(id: &NodeIdentity) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let inner =
        WebPkiClientVerifier::builder_with_provider(id.roots()?, provider.clone()).build()?;
    let verifier = Arc::new(PinnedClientVerifier {
        inner,
        pins: id.pins.clone(),
    });
    id.live.set_if_empty(id)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(id.live.clone()));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No session resumption: a resumed handshake skips the verifiers, so a
    // changed pin or a renewed certificate would not apply to it. Peer
    // links are long-lived; a full handshake each is cheap.
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// Client side: presents `id.live` (initialised to `id`'s certificate if
/// empty) and accepts only a server whose certificate chains to the cluster
/// CA, names the node dialled (`endpoint.connect_with(cfg, addr,
/// server_node_name)`) and, if that node has pins in `id.pins`, is pinned.
pub fn client_config(id: &NodeIdentity) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(id.roots()?, provider.clone())
        .build()
        .map_err(|e| TlsError::Quic(format!("server verifier: {e}")))?;
    let verifier = Arc::new(PinnedServerVerifier {
        inner,
        pins: id.pins.clone(),
    });
    id.live.set_if_empty(id)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(id.live.clone()));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // See server_config: every handshake is a full, verified one.
    tls.resumption = rustls::client::Resumption::disabled();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// The node name in the peer's verified certificate (its DNS SAN). Both
/// ends of a connection built from these configs have verified the chain.
pub fn peer_node(conn: &quinn::Connection) -> Result<String, TlsError> {
    let identity = conn.peer_identity().ok_or(TlsError::NoPeerCertificate)?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    node_name_of_cert(leaf.as_ref())
}

/// A signature made with a node's certificate key outside a handshake (a
/// hash batch, see `swarm::relay`), with the certificate that verifies it.
#[derive(Debug, Clone)]
pub struct NodeSignature {
    pub cert: CertificateDer<'static>,
    pub scheme: SignatureScheme,
    pub signature: Vec<u8>,
}

/// Schemes node signatures use: TLS 1.3 ones (each binds one curve and
/// hash), so whatever key type a node has, a verifier knows the algorithm.
const NODE_SIGNATURE_SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

impl LiveIdentity {
    /// Signs `msg` with the key of the certificate presented now, so a
    /// renewed identity signs with its new key.
    pub fn sign(&self, msg: &[u8]) -> Result<NodeSignature, TlsError> {
        let ck = self.get().ok_or_else(|| {
            TlsError::InvalidCertificate("no live certificate to sign with".into())
        })?;
        let cert = ck
            .cert
            .first()
            .cloned()
            .ok_or_else(|| TlsError::InvalidCertificate("empty certificate chain".into()))?;
        let signer = ck
            .key
            .choose_scheme(NODE_SIGNATURE_SCHEMES)
            .ok_or_else(|| {
                TlsError::InvalidCertificate(
                    "the node key supports no TLS 1.3 signature scheme".into(),
                )
            })?;
        Ok(NodeSignature {
            cert,
            scheme: signer.scheme(),
            signature: signer.sign(msg)?,
        })
    }
}

/// Why a node signature (or its certificate) was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("certificate does not stand for node {node}: {reason}")]
    Certificate { node: String, reason: String },
    #[error("certificate of node {node} is not valid now: {reason}")]
    Validity { node: String, reason: String },
    #[error(transparent)]
    NotPinned(TlsError),
    #[error("signature scheme {0:#06x} is not one nodes sign with")]
    Scheme(u16),
    #[error("signature does not verify: {0}")]
    Invalid(String),
}

/// Checks node certificates and node signatures outside a handshake: the
/// same CA chain, node name and pins as the QUIC verifiers
/// ([`server_config`], [`client_config`]). Cheap to clone.
#[derive(Clone)]
pub struct NodeSignatureVerifier {
    chain: Arc<WebPkiServerVerifier>,
    pins: PeerPins,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for NodeSignatureVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSignatureVerifier")
            .finish_non_exhaustive()
    }
}

impl NodeSignatureVerifier {
    /// Verifies against `id`'s CA and follows `id.pins` (shared).
    pub fn new(id: &NodeIdentity) -> Result<Self, TlsError> {
        let provider = provider();
        let chain = WebPkiServerVerifier::builder_with_provider(id.roots()?, provider.clone())
            .build()
            .map_err(|e| TlsError::Quic(format!("certificate verifier: {e}")))?;
        Ok(NodeSignatureVerifier {
            chain,
            pins: id.pins.clone(),
            provider,
        })
    }

    /// The pins this verifier follows.
    pub fn pins(&self) -> &PeerPins {
        &self.pins
    }

    /// Whether `der` is a certificate of the cluster CA, valid now, that
    /// names `node`, and (when `node` has published pins) is pinned.
    pub fn check_certificate(&self, node: &str, der: &[u8]) -> Result<(), SignatureError> {
        let bad = |reason: String| SignatureError::Certificate {
            node: node.to_string(),
            reason,
        };
        let name = ServerName::try_from(node.to_string()).map_err(|e| bad(e.to_string()))?;
        let cert = CertificateDer::from(der.to_vec());
        self.chain
            .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired
                    | rustls::CertificateError::ExpiredContext { .. }
                    | rustls::CertificateError::NotValidYet
                    | rustls::CertificateError::NotValidYetContext { .. },
                ) => SignatureError::Validity {
                    node: node.to_string(),
                    reason: e.to_string(),
                },
                e => bad(e.to_string()),
            })?;
        self.pins
            .check(node, der)
            .map_err(SignatureError::NotPinned)
    }

    /// Whether `signature` (TLS `scheme`) over `msg` verifies with the key
    /// of certificate `der`. The certificate itself is checked by
    /// [`NodeSignatureVerifier::check_certificate`].
    pub fn verify(
        &self,
        der: &[u8],
        scheme: u16,
        msg: &[u8],
        signature: &[u8],
    ) -> Result<(), SignatureError> {
        let scheme_t = SignatureScheme::from(scheme);
        if !NODE_SIGNATURE_SCHEMES.contains(&scheme_t) {
            return Err(SignatureError::Scheme(scheme));
        }
        // As rustls does for TLS 1.3: the scheme's first algorithm.
        let alg = self
            .provider
            .signature_verification_algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme_t)
            .and_then(|(_, algs)| algs.first())
            .ok_or(SignatureError::Scheme(scheme))?;
        let cert = CertificateDer::from(der);
        let ee = webpki::EndEntityCert::try_from(&cert)
            .map_err(|e| SignatureError::Invalid(format!("certificate: {e}")))?;
        ee.verify_signature(*alg, msg, signature)
            .map_err(|e| SignatureError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const T: Duration = Duration::from_secs(10);

    fn endpoint_server(id: &NodeIdentity) -> quinn::Endpoint {
        quinn::Endpoint::server(server_config(id).unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap()
    }

    /// Accepts connections and echoes one stream on each; reports each
    /// accepted peer's node name (or the handshake error) on `tx`.
    fn spawn_echo(
        ep: quinn::Endpoint,
        tx: tokio::sync::mpsc::UnboundedSender<Result<String, String>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => {
                            let _ = tx.send(peer_node(&conn).map_err(|e| e.to_string()));
                            if let Ok((mut send, mut recv)) = conn.accept_bi().await
                                && let Ok(data) = recv.read_to_end(1 << 20).await
                            {
                                let _ = send.write_all(&data).await;
                                let _ = send.finish();
                                let _ = send.stopped().await;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                        }
                    }
                });
            }
        })
    }

    /// Connects, sends `msg`, returns what was echoed back.
    async fn exchange(
        cfg: quinn::ClientConfig,
        addr: SocketAddr,
        name: &str,
        msg: &[u8],
    ) -> Result<Vec<u8>, String> {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let result = async {
            let conn = ep
                .connect_with(cfg, addr, name)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(msg).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let out = recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())?;
            if let Ok(n) = peer_node(&conn) {
                assert_eq!(n, name);
            }
            conn.close(0u32.into(), b"done");
            Ok(out)
        };
        let out = tokio::time::timeout(T, result)
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        ep.wait_idle().await;
        out
    }

    #[tokio::test]
    async fn mutual_tls_over_loopback() {
        let ca = ClusterCa::generate("peerfill test CA").unwrap();
        let server_id = ca.issue("node-a").unwrap();
        let client_id = ca.issue("node-b.pool-1").unwrap();
        let server = endpoint_server(&server_id);
        let addr = server.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = spawn_echo(server.clone(), tx);

        // Valid certificates: bytes flow, both sides learn the other's name.
        let cfg = client_config(&client_id).unwrap();
        let got = exchange(cfg.clone(), addr, "node-a", b"hello")
            .await
            .unwrap();
        assert_eq!(got, b"hello");
        let seen = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
        assert_eq!(seen, Ok("node-b.pool-1".to_string()));

        // Dialling the right address under another node's name fails: the
        // server's certificate names node-a only.
        assert!(exchange(cfg, addr, "node-c", b"x").await.is_err());
        let _ = tokio::time::timeout(T, rx.recv()).await;

        // A client with a certificate from another CA is refused.
        let other_ca = ClusterCa::generate("intruder CA").unwrap();
        let mut intruder = other_ca.issue("node-b").unwrap();
        // Trust the real CA, so only the client side is wrong.
        intruder.ca_pem = ca.cert_pem().to_string();
        let res = exchange(client_config(&intruder).unwrap(), addr, "node-a", b"secret").await;
        assert!(res.is_err(), "intruder got {res:?}");
        let seen = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
        assert!(seen.is_err(), "server accepted intruder: {seen:?}");

        // A client with no certificate at all is refused.
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(client_id.roots().unwrap())
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let anon = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ));
        let res = exchange(anon, addr, "node-a", b"secret").await;
        assert!(res.is_err(), "anonymous client got {res:?}");
        let seen = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
        assert!(seen.is_err(), "server accepted anonymous client: {seen:?}");

        // A client that trusts another CA refuses the real server.
        let mut wary = ca.issue("node-d").unwrap();
        wary.ca_pem = other_ca.cert_pem().to_string();
        assert!(
            exchange(client_config(&wary).unwrap(), addr, "node-a", b"x")
                .await
                .is_err()
        );

        server.close(0u32.into(), b"bye");
        task.abort();
    }

    /// The leaf certificate fingerprint the other end of `conn` presented.
    fn peer_fingerprint(conn: &quinn::Connection) -> String {
        let certs = conn
            .peer_identity()
            .unwrap()
            .downcast::<Vec<CertificateDer<'static>>>()
            .unwrap();
        cert_fingerprint(certs[0].as_ref())
    }

    /// Renewal: both ends swap their certificate while a connection is
    /// live; the live connection keeps working, new connections (accepted
    /// and dialled) present the new certificates.
    #[tokio::test]
    async fn renewed_certificates_are_used_by_new_connections_only() {
        let ca = ClusterCa::generate("peerfill test CA").unwrap();
        let mut server_id = ca.issue("node-a").unwrap();
        let mut client_id = ca.issue("node-b").unwrap();
        let server = endpoint_server(&server_id);
        let addr = server.local_addr().unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let client_cfg = client_config(&client_id).unwrap();
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let accept = tokio::spawn({
            let server = server.clone();
            async move {
                while let Some(incoming) = server.accept().await {
                    let Ok(conn) = incoming.await else { continue };
                    let _ = seen_tx.send(peer_fingerprint(&conn));
                    let conn2 = conn.clone();
                    tokio::spawn(async move {
                        while let Ok((mut send, mut recv)) = conn2.accept_bi().await {
                            if let Ok(data) = recv.read_to_end(1 << 20).await {
                                let _ = send.write_all(&data).await;
                                let _ = send.finish();
                            }
                        }
                    });
                }
            }
        });
        let echo = |conn: quinn::Connection, msg: &'static [u8]| async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(msg).await.unwrap();
            send.finish().unwrap();
            recv.read_to_end(1 << 20).await.unwrap()
        };
        tokio::time::timeout(T, async {
            let old = client
                .connect_with(client_cfg.clone(), addr, "node-a")
                .unwrap()
                .await
                .unwrap();
            assert_eq!(peer_fingerprint(&old), server_id.fingerprint().unwrap());
            assert_eq!(
                seen_rx.recv().await.unwrap(),
                client_id.fingerprint().unwrap()
            );

            let (old_server_fp, old_client_fp) = (
                server_id.fingerprint().unwrap(),
                client_id.fingerprint().unwrap(),
            );
            server_id.renew(&ca.issue("node-a").unwrap()).unwrap();
            client_id.renew(&ca.issue("node-b").unwrap()).unwrap();
            assert_ne!(server_id.fingerprint().unwrap(), old_server_fp);
            assert_eq!(
                server_id.live.fingerprint(),
                Some(server_id.fingerprint().unwrap())
            );

            // The live connection is untouched.
            assert_eq!(echo(old.clone(), b"still here").await, b"still here");
            // A new connection, with the configs built before the renewal.
            let new = client
                .connect_with(client_cfg.clone(), addr, "node-a")
                .unwrap()
                .await
                .unwrap();
            assert_eq!(peer_fingerprint(&new), server_id.fingerprint().unwrap());
            let seen = seen_rx.recv().await.unwrap();
            assert_eq!(seen, client_id.fingerprint().unwrap());
            assert_ne!(seen, old_client_fp);
            assert_eq!(echo(new, b"renewed").await, b"renewed");
            assert_eq!(echo(old, b"old too").await, b"old too");
            // Renewing to another node's certificate is refused.
            assert!(server_id.renew(&ca.issue("node-z").unwrap()).is_err());
        })
        .await
        .expect("renewal test timed out");
        accept.abort();
    }

    #[test]
    fn csr_flow() {
        let ca = ClusterCa::generate("ca").unwrap();
        let (csr, key) = generate_csr("node-1").unwrap();
        let cert = ca.sign_csr(&csr, "node-1").unwrap();
        let der = first_cert(&cert, "signed").unwrap();
        assert_eq!(node_name_of_cert(der.as_ref()).unwrap(), "node-1");
        // The issued certificate works with the CSR's key.
        let id = NodeIdentity::new("node-1".into(), cert, key, ca.cert_pem().into());
        server_config(&id).unwrap();
        client_config(&id).unwrap();

        assert!(matches!(
            ca.sign_csr(&csr, "node-2"),
            Err(TlsError::CsrNodeMismatch { .. })
        ));
        assert!(ca.sign_csr("garbage", "node-1").is_err());
        assert!(generate_csr("Not_A_Node").is_err());
        assert!(ca.issue("").is_err());
        assert!(ca.issue("node-1.x-").is_err());
    }

    #[test]
    fn ca_and_identity_round_trip_through_files() {
        let ca = ClusterCa::generate("ca").unwrap();
        let ca2 = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let id = ca2.issue("node-x").unwrap();
        let dir = tempfile::tempdir().unwrap();
        id.write(dir.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = NodeIdentity::load(
            &dir.path().join("tls.crt"),
            &dir.path().join("tls.key"),
            &dir.path().join("ca.crt"),
        )
        .unwrap();
        assert_eq!(loaded.node, "node-x");
        assert_eq!(loaded.cert_pem, id.cert_pem);
        assert_eq!(loaded.ca_pem, ca.cert_pem());

        // A node certificate is not a CA; a mismatched key is refused.
        assert!(ClusterCa::from_pem(&id.cert_pem, &id.key_pem).is_err());
        let other = ClusterCa::generate("other").unwrap();
        assert!(ClusterCa::from_pem(ca.cert_pem(), other.key_pem()).is_err());
        assert!(matches!(
            NodeIdentity::load(
                &dir.path().join("missing"),
                &dir.path().join("tls.key"),
                &dir.path().join("ca.crt"),
            ),
            Err(TlsError::Io { .. })
        ));
        std::fs::write(dir.path().join("empty"), "").unwrap();
        assert!(matches!(
            NodeIdentity::load(
                &dir.path().join("empty"),
                &dir.path().join("tls.key"),
                &dir.path().join("ca.crt"),
            ),
            Err(TlsError::MissingPem { .. })
        ));
    }

    /// Benchmark, not a check: streams 4 MiB pieces server -> client over a
    /// mutually authenticated loopback QUIC link and prints the throughput,
    /// one stream at a time and 4 streams at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark: cargo nextest run -p peerfill-agent --run-ignored only --no-capture bench_"]
    async fn bench_quic_piece_throughput() {
        const PIECE: usize = 4 << 20;
        const PIECES: usize = 64;
        let ca = ClusterCa::generate("bench").unwrap();
        let server = endpoint_server(&ca.issue("seeder").unwrap());
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let piece = bytes::Bytes::from(vec![7u8; PIECE]);
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let piece = piece.clone();
                tokio::spawn(async move {
                    let _ = recv.read_to_end(64).await;
                    let _ = send.write_chunk(piece).await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        });
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let cfg = client_config(&ca.issue("leecher").unwrap()).unwrap();
        let conn = client
            .connect_with(cfg, addr, "seeder")
            .unwrap()
            .await
            .unwrap();
        let fetch = |conn: quinn::Connection| async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(b"get").await.unwrap();
            send.finish().unwrap();
            let got = recv.read_to_end(PIECE).await.unwrap();
            assert_eq!(got.len(), PIECE);
        };
        for parallel in [1usize, 4] {
            let start = std::time::Instant::now();
            for _ in 0..PIECES / parallel {
                let batch: Vec<_> = (0..parallel)
                    .map(|_| tokio::spawn(fetch(conn.clone())))
                    .collect();
                for b in batch {
                    b.await.unwrap();
                }
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "BENCH QUIC loopback, {parallel} stream(s): {PIECES} x 4 MiB in {secs:.3}s = {:.0} MiB/s",
                (PIECES * 4) as f64 / secs
            );
        }
        conn.close(0u32.into(), b"done");
        accept.abort();
    }
}
