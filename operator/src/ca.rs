//! The cluster CA: kept in a Secret (created on first start, never rotated
//! silently) and used to answer agents' certificate requests.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use peerfill_agent::tls::ClusterCa;
use peerfill_crds::{IssuedIdentity, NodeFill};

use crate::error::Error;
use crate::select::request_digest;

pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";
/// Common name of a CA the operator generates.
pub const CA_COMMON_NAME: &str = "peerfill cluster CA";

fn secret_value<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|v| std::str::from_utf8(&v.0).ok())
}

/// Loads the CA from Secret `name`, creating it when missing. A Secret that
/// exists but does not hold a usable CA is an error: replacing it would cut
/// every agent off from its peers.
pub async fn load_or_create(api: &Api<Secret>, name: &str) -> Result<ClusterCa, Error> {
    let bad = |reason: String| Error::CaSecret {
        name: name.to_string(),
        reason,
    };
    for _ in 0..3 {
        if let Some(secret) = api
            .get_opt(name)
            .await
            .map_err(Error::kube("get", "Secret", name))?
        {
            let (Some(cert), Some(key)) = (
                secret_value(&secret, CA_CERT_KEY),
                secret_value(&secret, CA_KEY_KEY),
            ) else {
                return Err(bad(format!("lacks {CA_CERT_KEY} or {CA_KEY_KEY}")));
            };
            return ClusterCa::from_pem(cert, key).map_err(|e| bad(e.to_string()));
        }
        let ca = ClusterCa::generate(CA_COMMON_NAME)?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/name".to_string(),
                    "peerfill".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([
                (
                    CA_CERT_KEY.to_string(),
                    ByteString(ca.cert_pem().as_bytes().to_vec()),
                ),
                (
                    CA_KEY_KEY.to_string(),
                    ByteString(ca.key_pem().as_bytes().to_vec()),
                ),
            ])),
            ..Secret::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(secret = name, "created the cluster CA");
                return Ok(ca);
            }
            // Another replica created it first: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(Error::kube("create", "Secret", name)(e)),
        }
    }
    Err(bad("created and deleted concurrently".into()))
}

/// What to do about a NodeFill's certificate request.
#[derive(Debug, PartialEq, Eq)]
pub enum CsrDecision {
    /// No request, or it is already answered.
    Nothing,
    /// Sign the request (PEM) whose digest is given.
    Sign { csr: String, digest: String },
    /// Refuse it, with the reason.
    Refuse { digest: String, reason: String },
}

/// Pure part of control-path.md "Node identity" step 3: a request that is
/// new (its digest differs from `spec.identity.requestDigest`) is signed
/// if its Node exists; the CSR's own checks are [`ClusterCa::sign_csr`]'s.
pub fn csr_decision(fill: &NodeFill, node: Option<&Node>) -> CsrDecision {
    let Some(csr) = fill
        .status
        .as_ref()
        .and_then(|s| s.certificate_request.as_ref())
    else {
        return CsrDecision::Nothing;
    };
    let digest = request_digest(csr);
    if fill
        .spec
        .identity
        .as_ref()
        .is_some_and(|i| i.request_digest == digest)
    {
        return CsrDecision::Nothing;
    }
    match node {
        None => CsrDecision::Refuse {
            digest,
            reason: "no Node of this name exists".into(),
        },
        Some(n) if n.metadata.deletion_timestamp.is_some() => CsrDecision::Refuse {
            digest,
            reason: "the Node is being deleted".into(),
        },
        Some(_) => CsrDecision::Sign {
            csr: csr.clone(),
            digest,
        },
    }
}

/// Signs a request for node `name`. Node certificates are short-lived:
/// valid [`NODE_CERT_VALIDITY`](peerfill_agent::tls::NODE_CERT_VALIDITY)
/// (24 h) from now, `notBefore` backdated by
/// [`NODE_CERT_BACKDATE`](peerfill_agent::tls::NODE_CERT_BACKDATE) for clock
/// skew. Agents renew with a new CSR once
/// a third of that is left; a new request (new digest) is signed by
/// [`csr_decision`] like a first one, so renewal needs nothing more here.
pub fn answer(
    ca: &ClusterCa,
    name: &str,
    csr: &str,
    digest: String,
) -> Result<IssuedIdentity, Error> {
    let certificate = ca.sign_csr(csr, name)?;
    Ok(IssuedIdentity {
        certificate,
        ca_certificate: ca.cert_pem().to_string(),
        request_digest: digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerfill_crds::{NodeFillSpec, NodeFillStatus};

    fn fill(csr: Option<&str>, answered: Option<&str>) -> NodeFill {
        let mut f = NodeFill::new(
            "n1",
            NodeFillSpec {
                identity: answered.map(|c| IssuedIdentity {
                    certificate: "c".into(),
                    ca_certificate: "ca".into(),
                    request_digest: request_digest(c),
                }),
                ..NodeFillSpec::default()
            },
        );
        f.status = Some(NodeFillStatus {
            certificate_request: csr.map(str::to_string),
            ..NodeFillStatus::default()
        });
        f
    }

    #[test]
    fn decisions() {
        let node = Node::default();
        assert_eq!(
            csr_decision(&fill(None, None), Some(&node)),
            CsrDecision::Nothing
        );
        assert_eq!(
            csr_decision(&fill(Some("a"), Some("a")), Some(&node)),
            CsrDecision::Nothing
        );
        assert!(matches!(
            csr_decision(&fill(Some("b"), Some("a")), Some(&node)),
            CsrDecision::Sign { .. }
        ));
        assert!(matches!(
            csr_decision(&fill(Some("b"), None), None),
            CsrDecision::Refuse { .. }
        ));
    }

    #[test]
    fn signs_only_for_the_named_node() {
        let ca = ClusterCa::generate(CA_COMMON_NAME).unwrap();
        let (csr, _key) = peerfill_agent::tls::generate_csr("n1").unwrap();
        let id = answer(&ca, "n1", &csr, request_digest(&csr)).unwrap();
        assert!(id.certificate.contains("BEGIN CERTIFICATE"));
        assert_eq!(id.ca_certificate, ca.cert_pem());
        assert!(answer(&ca, "n2", &csr, request_digest(&csr)).is_err());
    }

    #[test]
    fn node_certificates_live_a_day() {
        use peerfill_agent::k8s::identity::{cert_validity, renewal_due};
        use peerfill_agent::tls::{NODE_CERT_BACKDATE, NODE_CERT_VALIDITY};
        let ca = ClusterCa::generate(CA_COMMON_NAME).unwrap();
        let (csr, _key) = peerfill_agent::tls::generate_csr("n1").unwrap();
        let id = answer(&ca, "n1", &csr, request_digest(&csr)).unwrap();
        let (not_before, not_after) = cert_validity(&id.certificate).unwrap();
        assert_eq!(
            NODE_CERT_VALIDITY,
            std::time::Duration::from_secs(24 * 3600)
        );
        assert_eq!(
            not_after.duration_since(not_before).unwrap(),
            NODE_CERT_VALIDITY + NODE_CERT_BACKDATE
        );
        let now = std::time::SystemTime::now();
        assert!(not_before < now && now < not_after);
        assert!(!renewal_due(not_before, not_after, now));
        assert!(renewal_due(not_before, not_after, not_after));
    }
}
