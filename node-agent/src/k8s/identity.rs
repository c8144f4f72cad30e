//! The node identity through the cluster CA (docs/control-path.md, "Node
//! identity"): a fresh key in the identity directory, its CSR in the
//! NodeFill status, and the certificate the operator answers with in
//! `spec.identity`, accepted only if it answers our request, holds our key
//! and names our node.
//!
//! Renewal: node certificates live [`tls::NODE_CERT_VALIDITY`] (24 h).
//! When [`renewal_due`] (a third of the lifetime left, or the jittered
//! point of [`renew_at`]), the agent generates a new key and CSR in
//! [`RENEWAL_DIR`] ([`Request::generate_renewal`]), writes the CSR to
//! `status.certificateRequest`, and once `spec.identity.requestDigest`
//! matches it ([`Request::accept`]) swaps the new certificate into the
//! running endpoint (`NodeIdentity::renew`: live connections continue, new
//! ones use it) and makes the new key the current one
//! ([`Request::promote_renewal`]).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use peerfill_crds::nodefill::IssuedIdentity;
use rcgen::{KeyPair, PublicKeyData};
use sha2::{Digest as _, Sha256};

use crate::tls::{self, NodeIdentity, TlsError};

/// File of the request next to the key in the identity directory.
pub const CSR_FILE: &str = "tls.csr";

/// Subdirectory of the identity directory holding the key and CSR of a
/// renewal in progress (the current key stays in place until the renewed
/// certificate is accepted, so a restart meanwhile still has a valid pair).
pub const RENEWAL_DIR: &str = "renewal";

/// Whether a certificate valid from `not_before` to `not_after` should be
/// renewed at `now`: less than a third of its lifetime is left (or it has
/// expired, or its validity is empty/inverted).
pub fn renewal_due(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
    now >= renew_at(not_before, not_after, 1.0)
}

/// When to renew a certificate valid from `not_before` to `not_after`:
/// between 60 % (`jitter` 0) and 2/3 (`jitter` 1) of its lifetime, so the
/// agents of a cluster started together do not all renew at once. `jitter`
/// is clamped to `[0, 1]`. An inverted validity gives `not_after` (the
/// certificate was never valid: renew at once).
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let Ok(lifetime) = not_after.duration_since(not_before) else {
        return not_after;
    };
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    let fraction = 0.6 + (2.0 / 3.0 - 0.6) * jitter;
    not_before + lifetime.mul_f64(fraction)
}

/// `notBefore` and `notAfter` of the first certificate in `pem`.
pub fn cert_validity(pem: &str) -> Result<(SystemTime, SystemTime), TlsError> {
    let der = cert_der(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| TlsError::InvalidCertificate(e.to_string()))?;
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    };
    let v = cert.validity();
    Ok((to_system(v.not_before), to_system(v.not_after)))
}

/// A pending request: our key and its CSR.
#[derive(Clone)]
pub struct Request {
    pub node: String,
    pub csr_pem: String,
    pub key_pem: String,
    /// `sha256:<hex>` of `csr_pem`, as the operator echoes it.
    pub digest: String,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("node", &self.node)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

/// Why an issued identity is not for us.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the issued certificate is for request {got}, ours is {want}")]
    OtherRequest { got: String, want: String },
    #[error("the issued certificate does not hold our public key")]
    OtherKey,
    #[error("the issued certificate names node {got}, we are {want}")]
    OtherNode { got: String, want: String },
    #[error("writing the key {path}: {source}")]
    WriteKey {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `sha256:<hex>` of a PEM text (the form of `requestDigest` and of
/// certificate fingerprints).
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

impl Request {
    /// Generates a key and CSR for `node` and writes the key (mode 0600)
    /// into `dir`, so the key is on the identity volume from the start.
    pub fn generate(node: &str, dir: &Path) -> Result<Request, IdentityError> {
        let (csr_pem, key_pem) = tls::generate_csr(node)?;
        std::fs::create_dir_all(dir).map_err(|source| IdentityError::WriteKey {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("tls.key");
        let _ = std::fs::remove_file(&path);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(key_pem.as_bytes())?;
            f.sync_all()
        };
        write().map_err(|source| IdentityError::WriteKey {
            path: path.clone(),
            source,
        })?;
        let csr_path = dir.join(CSR_FILE);
        std::fs::write(&csr_path, csr_pem.as_bytes()).map_err(|source| {
            IdentityError::WriteKey {
                path: csr_path,
                source,
            }
        })?;
        Ok(Request {
            node: node.to_string(),
            digest: sha256_digest(csr_pem.as_bytes()),
            csr_pem,
            key_pem,
        })
    }

    /// The request of an earlier run of this agent in the same pod (the
    /// identity directory survives container restarts, not a new pod), so
    /// a restarted agent keeps its key and certificate and the operator
    /// never sees it down; otherwise a new one (see [`Request::generate`]).
    pub fn load_or_generate(node: &str, dir: &Path) -> Result<Request, IdentityError> {
        match Self::load(node, dir) {
            Some(r) => {
                tracing::info!(digest = %r.digest, "reusing the key and request of the previous run");
                Ok(r)
            }
            None => Self::generate(node, dir),
        }
    }

    /// A new key and CSR for renewing `node`'s certificate, in
    /// `dir/`[`RENEWAL_DIR`] (the current key in `dir` is left alone).
    pub fn generate_renewal(node: &str, dir: &Path) -> Result<Request, IdentityError> {
        Self::generate(node, &dir.join(RENEWAL_DIR))
    }

    /// The renewal request of an earlier run (same pod), if one is pending.
    pub fn load_renewal(node: &str, dir: &Path) -> Option<Request> {
        Self::load(node, &dir.join(RENEWAL_DIR))
    }

    /// Makes the accepted renewal's key and CSR the current ones in `dir`
    /// (renames, so each file is replaced atomically).
    pub fn promote_renewal(dir: &Path) -> Result<(), IdentityError> {
        let next = dir.join(RENEWAL_DIR);
        for name in ["tls.key", CSR_FILE] {
            std::fs::rename(next.join(name), dir.join(name)).map_err(|source| {
                IdentityError::WriteKey {
                    path: dir.join(name),
                    source,
                }
            })?;
        }
        let _ = std::fs::remove_dir(&next);
        Ok(())
    }

    fn load(node: &str, dir: &Path) -> Option<Request> {
        let key_pem = std::fs::read_to_string(dir.join("tls.key")).ok()?;
        let csr_pem = std::fs::read_to_string(dir.join(CSR_FILE)).ok()?;
        let key = KeyPair::from_pem(&key_pem).ok()?;
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).ok()?;
        // The request must be for this node and this key.
        let names: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                rcgen::SanType::DnsName(n) => n.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if names != [node] || csr.public_key.der_bytes() != key.der_bytes() {
            tracing::warn!(dir = %dir.display(), "the stored request is for another node or key; requesting anew");
            return None;
        }
        Some(Request {
            node: node.to_string(),
            digest: sha256_digest(csr_pem.as_bytes()),
            csr_pem,
            key_pem,
        })
    }

    /// The identity issued for this request, if `issued` is one.
    pub fn accept(&self, issued: &IssuedIdentity) -> Result<NodeIdentity, IdentityError> {
        if issued.request_digest != self.digest {
            return Err(IdentityError::OtherRequest {
                got: issued.request_digest.clone(),
                want: self.digest.clone(),
            });
        }
        let der = cert_der(&issued.certificate)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| TlsError::InvalidCertificate(e.to_string()))?;
        let key = KeyPair::from_pem(&self.key_pem).map_err(TlsError::from)?;
        if cert.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
            return Err(IdentityError::OtherKey);
        }
        let named = tls::node_name_of_cert(&der)?;
        if named != self.node {
            return Err(IdentityError::OtherNode {
                got: named,
                want: self.node.clone(),
            });
        }
        Ok(NodeIdentity::new(
            self.node.clone(),
            issued.certificate.clone(),
            self.key_pem.clone(),
            issued.ca_certificate.clone(),
        ))
    }
}

/// Renewal of the running identity, driven by the NodeFill loop:
///
/// 1. every pass, [`Renewer::due_request`]: `Some(request)` when renewal is
///    due; its CSR goes to `status.certificateRequest` (instead of the
///    current request's);
/// 2. on every `spec.identity`, [`Renewer::on_issued`]: when it answers the
///    renewal, the new certificate is swapped into the running endpoint,
///    written to the identity directory and its key becomes the current
///    one; then publish `NodeIdentity::fingerprint` as
///    `status.certificateFingerprint`.
#[derive(Debug)]
pub struct Renewer {
    node: String,
    dir: std::path::PathBuf,
    /// Where in the renewal window this agent renews (see [`renew_at`]).
    jitter: f64,
    pending: Option<Request>,
}

impl Renewer {
    /// A renewer for `node` with identity directory `dir`; picks up a
    /// renewal left pending by an earlier run of this pod.
    pub fn new(node: &str, dir: &Path) -> Renewer {
        Renewer {
            node: node.to_string(),
            dir: dir.to_path_buf(),
            jitter: rand::random::<f64>(),
            pending: Request::load_renewal(node, dir),
        }
    }

    /// The renewal request to publish, if `current` is due at `now`
    /// (generated on first need, then kept until answered).
    pub fn due_request(
        &mut self,
        current: &NodeIdentity,
        now: SystemTime,
    ) -> Result<Option<&Request>, IdentityError> {
        if self.pending.is_none() {
            let (not_before, not_after) = cert_validity(&current.cert_pem)?;
            if now < renew_at(not_before, not_after, self.jitter) {
                return Ok(None);
            }
            tracing::info!(node = %self.node, "certificate renewal due; requesting a new one");
            self.pending = Some(Request::generate_renewal(&self.node, &self.dir)?);
        }
        Ok(self.pending.as_ref())
    }

    /// Whether a renewal is waiting for its answer.
    pub fn pending(&self) -> Option<&Request> {
        self.pending.as_ref()
    }

    /// Takes `issued` if it answers the pending renewal: swaps it into
    /// `current` (live connections continue, new ones use it), writes it
    /// to the identity directory and promotes its key. `Ok(false)`: not the
    /// answer (nothing pending, or the answer to another request).
    pub fn on_issued(
        &mut self,
        current: &mut NodeIdentity,
        issued: &IssuedIdentity,
    ) -> Result<bool, IdentityError> {
        let Some(pending) = &self.pending else {
            return Ok(false);
        };
        if issued.request_digest != pending.digest {
            return Ok(false);
        }
        let renewed = pending.accept(issued)?;
        current.renew(&renewed)?;
        Request::promote_renewal(&self.dir)?;
        renewed.write(&self.dir)?;
        tracing::info!(node = %self.node, "certificate renewed");
        self.pending = None;
        Ok(true)
    }
}

fn cert_der(pem: &str) -> Result<Vec<u8>, TlsError> {
    let first = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .ok_or_else(|| TlsError::MissingPem {
            what: "certificate",
            source_name: "spec.identity.certificate".into(),
        })?
        .map_err(|e| TlsError::InvalidPem {
            source_name: "spec.identity.certificate".into(),
            reason: e.to_string(),
        })?;
    Ok(first.as_ref().to_vec())
}

/// `sha256:<hex>` of the DER of the first certificate in `pem`.
pub fn fingerprint(pem: &str) -> Result<String, TlsError> {
    Ok(sha256_digest(&cert_der(pem)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::ClusterCa;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn accepts_only_its_own_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::generate("test-ca").expect("ca");
        let req = Request::generate("node-1", dir.path()).expect("request");
        let mode = std::fs::metadata(dir.path().join("tls.key"))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(req.digest, sha256_digest(req.csr_pem.as_bytes()));

        let answer = IssuedIdentity {
            certificate: ca.sign_csr(&req.csr_pem, "node-1").expect("sign"),
            ca_certificate: ca.cert_pem().to_string(),
            request_digest: req.digest.clone(),
        };
        let id = req.accept(&answer).expect("accepted");
        assert_eq!(id.node, "node-1");
        id.write(dir.path()).expect("write identity");
        NodeIdentity::load(
            &dir.path().join("tls.crt"),
            &dir.path().join("tls.key"),
            &dir.path().join("ca.crt"),
        )
        .expect("the written identity loads");
        assert!(
            fingerprint(&answer.certificate)
                .expect("fp")
                .starts_with("sha256:")
        );

        // An answer to an older request (a previous pod's key).
        let old = Request::generate("node-1", &dir.path().join("old")).expect("request");
        let stale = IssuedIdentity {
            certificate: ca.sign_csr(&old.csr_pem, "node-1").expect("sign"),
            ca_certificate: ca.cert_pem().to_string(),
            request_digest: old.digest.clone(),
        };
        assert!(matches!(
            req.accept(&stale),
            Err(IdentityError::OtherRequest { .. })
        ));
        // Our digest, but somebody else's key.
        let forged = IssuedIdentity {
            request_digest: req.digest.clone(),
            ..stale
        };
        assert!(matches!(req.accept(&forged), Err(IdentityError::OtherKey)));

        // A restarted agent reuses its key and request; another node's
        // name does not.
        let again = Request::load_or_generate("node-1", dir.path()).expect("reload");
        assert_eq!(again.digest, req.digest);
        assert_eq!(again.key_pem, req.key_pem);
        let other = Request::load_or_generate("node-2", dir.path()).expect("new request");
        assert_ne!(other.digest, req.digest);
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renewal_timing() {
        let (nb, na) = (at(1_000_000), at(1_000_000 + 24 * 3600));
        // Fresh: not due; 2/3 of the lifetime gone: due; expired: due.
        assert!(!renewal_due(nb, na, nb));
        assert!(!renewal_due(nb, na, at(1_000_000 + 15 * 3600)));
        assert!(renewal_due(nb, na, at(1_000_000 + 16 * 3600)));
        assert!(renewal_due(nb, na, at(1_000_000 + 30 * 3600)));
        // Jittered points lie between 60 % and 2/3 of the lifetime.
        let lifetime = 24 * 3600;
        assert_eq!(renew_at(nb, na, 0.0), at(1_000_000 + lifetime * 6 / 10));
        assert_eq!(renew_at(nb, na, 1.0), at(1_000_000 + lifetime * 2 / 3));
        let mid = renew_at(nb, na, 0.5);
        assert!(mid > renew_at(nb, na, 0.0) && mid < renew_at(nb, na, 1.0));
        assert_eq!(renew_at(nb, na, 7.0), renew_at(nb, na, 1.0));
        assert_eq!(renew_at(nb, na, f64::NAN), renew_at(nb, na, 0.0));
        // Inverted validity: renew at once.
        assert!(renewal_due(na, nb, nb));
    }

    #[test]
    fn issued_certificates_are_short_lived_and_renewed_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::generate("test-ca").expect("ca");
        let req = Request::generate("node-1", dir.path()).expect("request");
        let answer = |r: &Request| IssuedIdentity {
            certificate: ca.sign_csr(&r.csr_pem, "node-1").expect("sign"),
            ca_certificate: ca.cert_pem().to_string(),
            request_digest: r.digest.clone(),
        };
        let mut id = req.accept(&answer(&req)).expect("accepted");
        let (nb, na) = cert_validity(&id.cert_pem).expect("validity");
        let now = SystemTime::now();
        assert_eq!(
            na.duration_since(nb).expect("ordered"),
            tls::NODE_CERT_VALIDITY + tls::NODE_CERT_BACKDATE
        );
        assert!(nb <= now && now < na);
        assert!(!renewal_due(nb, na, now));
        assert!(renewal_due(nb, na, now + Duration::from_secs(17 * 3600)));

        // Renewal: a new key beside the current one, which stays in place.
        let renewal = Request::generate_renewal("node-1", dir.path()).expect("renewal");
        assert_ne!(renewal.digest, req.digest);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("tls.key")).expect("key"),
            req.key_pem
        );
        assert_eq!(
            Request::load_renewal("node-1", dir.path()).map(|r| r.digest),
            Some(renewal.digest.clone())
        );
        // The answer to the old request is not the renewal's.
        assert!(matches!(
            renewal.accept(&answer(&req)),
            Err(IdentityError::OtherRequest { .. })
        ));
        let renewed = renewal.accept(&answer(&renewal)).expect("renewed");
        let old_fp = id.fingerprint().expect("fp");
        id.renew(&renewed).expect("swap");
        assert_eq!(
            id.fingerprint().expect("fp"),
            renewed.fingerprint().expect("fp")
        );
        assert_ne!(id.fingerprint().expect("fp"), old_fp);
        Request::promote_renewal(dir.path()).expect("promote");
        let reloaded = Request::load_or_generate("node-1", dir.path()).expect("reload");
        assert_eq!(reloaded.digest, renewal.digest);
        assert!(Request::load_renewal("node-1", dir.path()).is_none());
    }

    #[test]
    fn renewer_requests_when_due_and_swaps_the_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::generate("test-ca").expect("ca");
        let answer = |r: &Request| IssuedIdentity {
            certificate: ca.sign_csr(&r.csr_pem, "node-1").expect("sign"),
            ca_certificate: ca.cert_pem().to_string(),
            request_digest: r.digest.clone(),
        };
        let first = Request::load_or_generate("node-1", dir.path()).expect("request");
        let first_answer = answer(&first);
        let mut id = first.accept(&first_answer).expect("accepted");
        let (_, not_after) = cert_validity(&id.cert_pem).expect("validity");
        let now = SystemTime::now();

        let mut r = Renewer::new("node-1", dir.path());
        assert!(r.due_request(&id, now).expect("check").is_none());
        // The current answer is not a renewal's.
        assert!(!r.on_issued(&mut id, &first_answer).expect("ignored"));
        let due = r
            .due_request(&id, not_after)
            .expect("due")
            .expect("request")
            .clone();
        // Asked again before the answer: the same request.
        let again = r
            .due_request(&id, not_after)
            .expect("due")
            .expect("request");
        assert_eq!(again.digest, due.digest);
        // A restarted agent picks the pending renewal up.
        let restarted = Renewer::new("node-1", dir.path());
        assert_eq!(
            restarted.pending().map(|p| p.digest.clone()),
            Some(due.digest.clone())
        );

        let old_fp = id.fingerprint().expect("fp");
        assert!(r.on_issued(&mut id, &answer(&due)).expect("renewed"));
        assert_ne!(id.fingerprint().expect("fp"), old_fp);
        assert!(r.pending().is_none());
        // The files on disk are the renewed identity.
        let on_disk = NodeIdentity::load(
            &dir.path().join("tls.crt"),
            &dir.path().join("tls.key"),
            &dir.path().join("ca.crt"),
        )
        .expect("written");
        assert_eq!(
            on_disk.fingerprint().expect("fp"),
            id.fingerprint().expect("fp")
        );
        assert_eq!(
            Request::load_or_generate("node-1", dir.path())
                .expect("reload")
                .digest,
            due.digest
        );
        // Fresh again: nothing due.
        assert!(
            r.due_request(&id, SystemTime::now())
                .expect("check")
                .is_none()
        );
    }
}
