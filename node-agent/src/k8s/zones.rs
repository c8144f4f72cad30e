//! Which peers sit in another zone than this node: the operator names every
//! peer's zone in `spec.peers[].zone`, the agent knows its own from its
//! Node's zone label. The swarm's picker asks those peers only when
//! same-zone peers offer nothing (cross-zone links are the scarce, metered
//! ones). A peer or a node without a zone is never remote, so a cluster
//! without zone labels behaves as one zone.

use std::collections::HashSet;

use peerfill_crds::nodefill::NodeFillSpec;

/// Nodes of `spec.peers` whose zone is known and differs from `own`.
pub fn remote_nodes(spec: &NodeFillSpec, own: Option<&str>) -> HashSet<String> {
    let Some(own) = own else {
        return HashSet::new();
    };
    spec.peers
        .iter()
        .filter(|p| p.zone.as_deref().is_some_and(|z| z != own))
        .map(|p| p.node.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerfill_crds::nodefill::PeerEndpoint;

    fn spec(peers: &[(&str, Option<&str>)]) -> NodeFillSpec {
        NodeFillSpec {
            peers: peers
                .iter()
                .map(|(n, z)| PeerEndpoint {
                    node: (*n).into(),
                    endpoint: "127.0.0.1:7443".into(),
                    zone: z.map(str::to_string),
                    ..PeerEndpoint::default()
                })
                .collect(),
            ..NodeFillSpec::default()
        }
    }

    #[test]
    fn only_peers_known_to_be_elsewhere_are_remote() {
        let s = spec(&[("a", Some("z1")), ("b", Some("z2")), ("c", None)]);
        let remote = remote_nodes(&s, Some("z1"));
        assert_eq!(remote, HashSet::from(["b".to_string()]));
        // Without our own zone nothing is remote: as in a one-zone cluster.
        assert!(remote_nodes(&s, None).is_empty());
    }
}
