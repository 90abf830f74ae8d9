//! Identity URIs: `spiffe://<cluster>/tenant/<t>/owner/<o>/runner/<id>` for runners and
//! `spiffe://<cluster>/node/<id>` for broker nodes (the cluster seam).

use crate::CertError;

/// Longest segment (cluster, tenant, owner, runner or node id) accepted.
pub const MAX_SEGMENT_LEN: usize = 128;

/// Checks one identity segment: 1..=128 of `[A-Za-z0-9._-]`, not `.` or `..`.
///
/// The same rule applies to tenant and owner ids coming in through the API, so anything
/// that can be named can also be written into a certificate.
pub fn validate_segment(what: &str, s: &str) -> Result<(), CertError> {
    let ok_chars = s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if s.is_empty() || s.len() > MAX_SEGMENT_LEN || !ok_chars || s == "." || s == ".." {
        return Err(CertError::Identity(format!(
            "{what} must be 1-{MAX_SEGMENT_LEN} characters of A-Z a-z 0-9 . _ -"
        )));
    }
    Ok(())
}

/// Who a runner certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunnerIdentity {
    /// Cluster name (the SPIFFE trust domain).
    pub cluster: String,
    /// Tenant id.
    pub tenant: String,
    /// Owner id within the tenant.
    pub owner: String,
    /// Runner id.
    pub runner: String,
}

impl RunnerIdentity {
    /// Builds an identity, validating every segment.
    pub fn new(cluster: &str, tenant: &str, owner: &str, runner: &str) -> Result<Self, CertError> {
        validate_segment("cluster", cluster)?;
        validate_segment("tenant", tenant)?;
        validate_segment("owner", owner)?;
        validate_segment("runner", runner)?;
        Ok(Self {
            cluster: cluster.into(),
            tenant: tenant.into(),
            owner: owner.into(),
            runner: runner.into(),
        })
    }

    /// The URI SAN.
    pub fn uri(&self) -> String {
        format!(
            "spiffe://{}/tenant/{}/owner/{}/runner/{}",
            self.cluster, self.tenant, self.owner, self.runner
        )
    }
}

/// Who a node certificate says its holder is (cluster seam; not issued yet).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeIdentity {
    /// Cluster name.
    pub cluster: String,
    /// Node id.
    pub node: String,
}

impl NodeIdentity {
    /// The URI SAN.
    pub fn uri(&self) -> String {
        format!("spiffe://{}/node/{}", self.cluster, self.node)
    }
}

/// Any identity a runnel certificate can carry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A runner.
    Runner(RunnerIdentity),
    /// A broker node.
    Node(NodeIdentity),
}

impl Identity {
    /// Parses an identity URI, refusing anything that is not exactly one of the two shapes.
    pub fn parse_uri(uri: &str) -> Result<Self, CertError> {
        let bad = || CertError::Identity(format!("not a runnel identity URI: {uri:?}"));
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [cluster, "tenant", tenant, "owner", owner, "runner", runner] => {
                Ok(Identity::Runner(RunnerIdentity::new(cluster, tenant, owner, runner)?))
            }
            [cluster, "node", node] => {
                validate_segment("cluster", cluster)?;
                validate_segment("node", node)?;
                Ok(Identity::Node(NodeIdentity {
                    cluster: (*cluster).into(),
                    node: (*node).into(),
                }))
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_uri_round_trips() {
        let id = RunnerIdentity::new("c1", "acme", "alice", "r-01").expect("valid");
        assert_eq!(id.uri(), "spiffe://c1/tenant/acme/owner/alice/runner/r-01");
        assert_eq!(Identity::parse_uri(&id.uri()).expect("parse"), Identity::Runner(id));
    }

    #[test]
    fn node_uri_round_trips() {
        let id = NodeIdentity { cluster: "c1".into(), node: "n1".into() };
        assert_eq!(Identity::parse_uri(&id.uri()).expect("parse"), Identity::Node(id));
    }

    #[test]
    fn malformed_uris_and_segments_are_refused() {
        for uri in [
            "https://c1/tenant/a/owner/b/runner/c",
            "spiffe://c1/tenant/a/owner/b/runner/c/extra",
            "spiffe://c1/tenant/a/owner/b",
            "spiffe://c1/tenant/../owner/b/runner/c",
            "spiffe://c1/tenant/a b/owner/b/runner/c",
            "spiffe://c1/tenant//owner/b/runner/c",
            "spiffe://c1/owner/a/tenant/b/runner/c",
        ] {
            assert!(Identity::parse_uri(uri).is_err(), "{uri} should be refused");
        }
        assert!(validate_segment("tenant", &"a".repeat(MAX_SEGMENT_LEN + 1)).is_err());
        assert!(validate_segment("tenant", "ok.name_1-2").is_ok());
    }
}
