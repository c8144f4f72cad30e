//! The Distribution the demo applies: `examples/http.yaml`, pointed at the
//! local origin.

use peerfill_crds::Distribution;

/// The example as shipped (compiled in, so the demo reads the same file the
/// README shows).
pub const HTTP_EXAMPLE: &str = include_str!("../../../examples/http.yaml");

/// The example cannot be turned into the demo's Distribution.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The YAML does not parse as a Distribution.
    #[error("examples/http.yaml is not a Distribution: {0}")]
    Parse(String),
    /// It has no http source to point at the origin.
    #[error("examples/http.yaml has no spec.source.http")]
    NoHttpSource,
}

/// `examples/http.yaml` with the origin's `url`, the artifact's `digest`,
/// no `headersFrom` (the local origin needs no credentials), in
/// `namespace`, and `piece_size` if given.
pub fn demo_distribution(
    url: &str,
    digest: &str,
    namespace: &str,
    piece_size: Option<u64>,
) -> Result<Distribution, ManifestError> {
    let mut dist: Distribution =
        serde_saphyr::from_str(HTTP_EXAMPLE).map_err(|e| ManifestError::Parse(e.to_string()))?;
    let http = dist
        .spec
        .source
        .http
        .as_mut()
        .ok_or(ManifestError::NoHttpSource)?;
    http.url = url.to_owned();
    http.digest = Some(digest.to_owned());
    http.headers_from = None;
    if let Some(size) = piece_size {
        dist.spec.strategy.piece_size = Some(size);
    }
    dist.metadata.namespace = Some(namespace.to_owned());
    Ok(dist)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_pointed_at_the_origin() {
        let digest = format!("blake3:{}", "ab".repeat(32));
        let d = demo_distribution("http://127.0.0.9:8080/artifact", &digest, "default", None)
            .expect("example parses");
        let http = d.spec.source.http.as_ref().expect("http source");
        assert_eq!(http.url, "http://127.0.0.9:8080/artifact");
        assert_eq!(http.digest.as_deref(), Some(digest.as_str()));
        assert!(http.headers_from.is_none());
        assert_eq!(d.metadata.name.as_deref(), Some("model-weights"));
        assert_eq!(d.metadata.namespace.as_deref(), Some("default"));
        // The example's own piece size stays unless asked otherwise.
        assert_eq!(d.spec.strategy.piece_size, None);
        let d = demo_distribution("http://127.0.0.9/a", &digest, "ns", Some(1 << 20))
            .expect("example parses");
        assert_eq!(d.spec.strategy.piece_size, Some(1 << 20));
        // Still valid by the CRD's own rules.
        d.spec.validate().expect("valid spec");
    }
}
