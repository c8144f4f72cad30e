//! `spec.source.http.headersFrom`: request headers for the origin, from a
//! Secret in the Distribution's namespace.
//!
//! Only origin readers talk to the origin, so only they read the Secret,
//! each time a content (re)starts, so a rotated token is picked up on the
//! next start. Every data key is a header name and its value the header
//! value. The values go into the origin client and nowhere else: errors
//! name the Secret and the key, never a value; the agent's config types
//! print headers redacted ([`crate::agent::Headers`]); nothing of them is
//! reported in NodeFill status or Events or written to disk.
//!
//! Which namespaces the agents may read Secrets in is the chart's decision
//! (`agent.headerSecretNamespaces`, one Role each); a Secret elsewhere is
//! refused by the API server and reported as such.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use peerfill_crds::nodefill::{Assignment, SecretRef};

use super::translate::Desired;
use crate::agent::{Headers, SourceConfig};

/// How often contents held back by their headers Secret are tried again
/// (the Secret may be created or fixed without any NodeFill change).
pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// Why the headers of a content are not available.
#[derive(Debug, thiserror::Error)]
pub enum HeadersError {
    #[error("Secret {namespace}/{name} (headersFrom) does not exist")]
    NotFound { namespace: String, name: String },
    #[error(
        "the agent may not read Secret {namespace}/{name} (headersFrom): list namespace {namespace} in the chart's agent.headerSecretNamespaces"
    )]
    Forbidden { namespace: String, name: String },
    #[error("Secret {namespace}/{name} (headersFrom) has no data keys")]
    Empty { namespace: String, name: String },
    #[error("Secret {namespace}/{name} (headersFrom): key {key:?} is not a valid HTTP header name")]
    BadName {
        namespace: String,
        name: String,
        key: String,
    },
    // The value itself is never printed.
    #[error(
        "Secret {namespace}/{name} (headersFrom): the value of key {key:?} is not a valid HTTP header value"
    )]
    BadValue {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("reading Secret {namespace}/{name} (headersFrom): {message}")]
    Api {
        namespace: String,
        name: String,
        message: String,
    },
}

impl HeadersError {
    /// The NodeFill status reason.
    pub fn reason(&self) -> &'static str {
        match self {
            HeadersError::NotFound { .. } => "OriginHeadersSecretNotFound",
            HeadersError::Forbidden { .. } => "OriginHeadersSecretForbidden",
            HeadersError::Empty { .. }
            | HeadersError::BadName { .. }
            | HeadersError::BadValue { .. } => "InvalidOriginHeaders",
            HeadersError::Api { .. } => "OriginHeadersSecretUnreadable",
        }
    }

    /// Whether reading again later may succeed without anyone editing the
    /// Secret (the API server was unavailable).
    pub fn is_transient(&self) -> bool {
        matches!(self, HeadersError::Api { .. })
    }
}

/// Adds the headers of `a`'s `headersFrom` Secret to a runnable content when
/// this node reads the origin. A missing, forbidden or malformed Secret
/// makes the content Failed (Pending while the API server cannot be asked),
/// with a reason and a message that name the Secret.
pub async fn resolve(client: &Client, a: &Assignment, me: &str, desired: Desired) -> Desired {
    let Desired::Run(mut cfg) = desired else {
        return desired;
    };
    let Some(r) = a
        .source
        .http
        .as_ref()
        .and_then(|h| h.headers_secret.as_ref())
    else {
        return Desired::Run(cfg);
    };
    let SourceConfig::Http {
        headers, readers, ..
    } = &mut cfg.source
    else {
        return Desired::Run(cfg);
    };
    if !readers.iter().any(|n| n == me) {
        return Desired::Run(cfg);
    }
    match read(client, r).await {
        Ok(h) => {
            *headers = Headers(h);
            Desired::Run(cfg)
        }
        Err(e) if e.is_transient() => Desired::Wait {
            reason: e.reason(),
            message: e.to_string(),
        },
        Err(e) => Desired::Invalid {
            reason: e.reason(),
            message: e.to_string(),
        },
    }
}

/// Whether `reason` is one [`resolve`] gives (worth a [`RECHECK`]).
pub fn is_headers_reason(reason: &str) -> bool {
    matches!(
        reason,
        "OriginHeadersSecretNotFound"
            | "OriginHeadersSecretForbidden"
            | "OriginHeadersSecretUnreadable"
            | "InvalidOriginHeaders"
    )
}

/// Reads the Secret `r` and turns its data into headers.
pub async fn read(
    client: &Client,
    r: &SecretRef,
) -> Result<BTreeMap<String, String>, HeadersError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &r.namespace);
    let (namespace, name) = (r.namespace.clone(), r.name.clone());
    match api.get(&r.name).await {
        Ok(secret) => headers_of(&secret, r),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            Err(HeadersError::NotFound { namespace, name })
        }
        Err(kube::Error::Api(e)) if e.code == 403 => {
            Err(HeadersError::Forbidden { namespace, name })
        }
        Err(e) => Err(HeadersError::Api {
            namespace,
            name,
            message: e.to_string(),
        }),
    }
}

/// The headers in `secret`'s data: each key a header name, each value its
/// value (the bytes as they are; no trailing newline is trimmed, as that
/// would silently send something else than the Secret holds).
pub fn headers_of(
    secret: &Secret,
    r: &SecretRef,
) -> Result<BTreeMap<String, String>, HeadersError> {
    let (namespace, name) = (r.namespace.clone(), r.name.clone());
    let data = secret.data.clone().unwrap_or_default();
    if data.is_empty() {
        return Err(HeadersError::Empty { namespace, name });
    }
    let mut out = BTreeMap::new();
    for (key, value) in data {
        if http::HeaderName::from_bytes(key.as_bytes()).is_err() {
            return Err(HeadersError::BadName {
                namespace,
                name,
                key,
            });
        }
        let valid = http::HeaderValue::from_bytes(&value.0).is_ok();
        match String::from_utf8(value.0) {
            Ok(v) if valid => {
                out.insert(key, v);
            }
            _ => {
                return Err(HeadersError::BadValue {
                    namespace,
                    name,
                    key,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;

    use super::*;

    fn secret(pairs: &[(&str, &[u8])]) -> Secret {
        Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    fn sref() -> SecretRef {
        SecretRef {
            namespace: "models".into(),
            name: "registry-token".into(),
        }
    }

    #[test]
    fn every_data_key_is_a_header() {
        let h = headers_of(
            &secret(&[("Authorization", b"Bearer s3cr3t"), ("X-Api-Key", b"k")]),
            &sref(),
        )
        .unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h["Authorization"], "Bearer s3cr3t");
    }

    #[test]
    fn bad_secrets_are_refused_naming_the_key_but_never_the_value() {
        let empty = headers_of(&Secret::default(), &sref()).unwrap_err();
        assert_eq!(empty.reason(), "InvalidOriginHeaders");
        assert!(empty.to_string().contains("models/registry-token"));

        let name = headers_of(&secret(&[("Bad Header", b"v")]), &sref()).unwrap_err();
        assert!(name.to_string().contains("\"Bad Header\""));

        let value =
            headers_of(&secret(&[("Authorization", b"Bearer s3cr3t\n")]), &sref()).unwrap_err();
        assert_eq!(value.reason(), "InvalidOriginHeaders");
        let shown = format!("{value} {value:?}");
        assert!(shown.contains("Authorization"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    #[test]
    fn a_logged_config_shows_header_names_only() {
        let h = Headers(BTreeMap::from([(
            "Authorization".to_string(),
            "Bearer s3cr3t".to_string(),
        )]));
        let shown = format!("{h:?}");
        assert!(
            shown.contains("Authorization") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }

    #[test]
    fn reasons_tell_missing_forbidden_and_unreadable_apart() {
        let (namespace, name) = ("ns".to_string(), "s".to_string());
        let nf = HeadersError::NotFound {
            namespace: namespace.clone(),
            name: name.clone(),
        };
        assert_eq!(nf.reason(), "OriginHeadersSecretNotFound");
        assert!(!nf.is_transient());
        let fb = HeadersError::Forbidden {
            namespace: namespace.clone(),
            name: name.clone(),
        };
        assert_eq!(fb.reason(), "OriginHeadersSecretForbidden");
        assert!(fb.to_string().contains("agent.headerSecretNamespaces"));
        let api = HeadersError::Api {
            namespace,
            name,
            message: "timed out".into(),
        };
        assert!(api.is_transient());
    }
}
