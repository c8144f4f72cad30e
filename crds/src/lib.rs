//! Custom resource types of peerfill (group `peerfill.dev`, version
//! `v1alpha1`):
//!
//! - [`Distribution`] (namespaced, short name `dist`): what users write —
//!   put this content on those nodes.
//! - [`NodeFill`] (cluster-scoped, short name `nf`, one per Node with the
//!   Node's name): the per-node work; spec by the operator, status by the
//!   node's agent.
//!
//! The CRD YAML in `crds/*.yaml` is generated from these types by
//! `cargo run -p peerfill-crds --bin crdgen`; [`crds`] returns the same
//! objects for code that installs them.

pub mod budget;
pub mod crdgen;
pub mod distribution;
pub mod format;
pub mod nodefill;
pub mod validation;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

pub use distribution::{
    CONDITION_COMPLETE, CONDITION_FAILED, CONDITION_PROGRESSING, Distribution, DistributionSpec,
    DistributionStatus, FailingNode, HeadersFrom, HttpFile, HttpSource, NodeSource, Phase, Source,
    Strategy, Target,
};
pub use format::{format_bytes, format_bytes_per_second, progress_string, ready_string};
pub use nodefill::{
    Assignment, FINALIZER, IssuedIdentity, NODE_LABEL_PREFIX, NODE_LABEL_VALUE,
    NodeDistributionStatus, NodeFill, NodeFillSpec, NodeFillStatus, NodePhase, OriginReader,
    PeerEndpoint, PieceRange, ResolvedHttpFile, ResolvedHttpSource, ResolvedSource, Role,
    SecretRef, SeedNode, node_label_key,
};
pub use validation::{Problem, ValidationError, ValidationErrors};

/// API group of all peerfill resources.
pub const GROUP: &str = "peerfill.dev";
/// API version of all peerfill resources.
pub const VERSION: &str = "v1alpha1";

/// A CRD with the file it is checked in as (relative to `crds/`).
pub struct GeneratedCrd {
    /// File name, e.g. `distribution.yaml`.
    pub file_name: &'static str,
    /// The CustomResourceDefinition.
    pub crd: CustomResourceDefinition,
}

/// Every CRD of peerfill, in the order they should be installed. Use these
/// rather than `Distribution::crd()`: they carry the integer formats
/// Kubernetes knows (see [`normalize_integer_formats`]).
pub fn crds() -> Vec<GeneratedCrd> {
    vec![
        GeneratedCrd {
            file_name: "distribution.yaml",
            crd: normalized(Distribution::crd()),
        },
        GeneratedCrd {
            file_name: "nodefill.yaml",
            crd: normalized(NodeFill::crd()),
        },
    ]
}

fn normalized(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        normalize_integer_formats(schema);
    }
    crd
}

/// Replaces the unsigned integer formats schemars emits for Rust's `u8`..
/// `u64` (`uint32`, `uint64`, ...) with the OpenAPI formats Kubernetes
/// understands (`int32`, `int64`). The `minimum: 0` schemars adds alongside
/// stays, so negative values are still refused by the API server.
pub fn normalize_integer_formats(schema: &mut JSONSchemaProps) {
    if schema.type_.as_deref() == Some("integer") {
        let format = match schema.format.as_deref() {
            Some("uint8" | "uint16" | "uint32") => Some("int32"),
            Some("uint64" | "uint") => Some("int64"),
            _ => None,
        };
        if let Some(format) = format {
            schema.format = Some(format.to_owned());
        }
    }
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        normalize_integer_formats(child);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        normalize_integer_formats(items);
    }
    if let Some(JSONSchemaPropsOrArray::Schemas(items)) = schema.items.as_mut() {
        items.iter_mut().for_each(normalize_integer_formats);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(extra)) = schema.additional_properties.as_mut() {
        normalize_integer_formats(extra);
    }
    for group in [&mut schema.all_of, &mut schema.any_of, &mut schema.one_of] {
        group
            .iter_mut()
            .flatten()
            .for_each(normalize_integer_formats);
    }
}
