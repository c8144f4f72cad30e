//! The node identity through the cluster CA (docs/control-path.md, "Node
//! identity"): a fresh key in the identity directory, its CSR in the
//! NodeFill status, and the certificate the operator answers with in
//! `spec.identity`, accepted only if it answers our request, holds our key
//! and names our node.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use peerfill_crds::nodefill::IssuedIdentity;
use rcgen::{KeyPair, PublicKeyData};
use sha2::{Digest as _, Sha256};

use crate::tls::{self, NodeIdentity, TlsError};

/// File of the request next to the key in the identity directory.
pub const CSR_FILE: &str = "tls.csr";

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
        Ok(NodeIdentity {
            node: self.node.clone(),
            cert_pem: issued.certificate.clone(),
            key_pem: self.key_pem.clone(),
            ca_pem: issued.ca_certificate.clone(),
        })
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
}
