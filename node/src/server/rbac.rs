//! Who may call what on the API port: one table from RPC to the role it needs.
//!
//! Roles are ordered (`read` < `infer` < `operator` < `admin`); a caller's role allows every
//! RPC that needs it or a lower one. An RPC missing from the table needs `admin`, so a new
//! RPC is closed until it is listed here. Health checks need no credential: load balancers
//! and orchestrators probe them.

use troupe_transport::Role;

/// `(method path, role)`. `None` is public.
pub const TABLE: &[(&str, Option<Role>)] = &[
    // Public: liveness and readiness probes.
    ("/grpc.health.v1.Health/Check", None),
    ("/grpc.health.v1.Health/Watch", None),
    // read: status, lists, watch, history, and what the API looks like.
    ("/troupe.v1.Admin/NodeStatus", Some(Role::Read)),
    ("/troupe.v1.Admin/ListPriorities", Some(Role::Read)),
    ("/troupe.v1.Admin/ListModels", Some(Role::Read)),
    ("/troupe.v1.Admin/ActorTree", Some(Role::Read)),
    ("/troupe.v1.Admin/GetSetting", Some(Role::Read)),
    ("/troupe.v1.Admin/ListSettings", Some(Role::Read)),
    ("/troupe.v1.Admin/Watch", Some(Role::Read)),
    ("/troupe.v1.Admin/History", Some(Role::Read)),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Some(Role::Read),
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        Some(Role::Read),
    ),
    // infer: inference.
    ("/troupe.v1.Inference/Embed", Some(Role::Infer)),
    ("/troupe.v1.Inference/Generate", Some(Role::Infer)),
    // operator: metadata writes and actor restarts.
    ("/troupe.v1.Admin/SetPriority", Some(Role::Operator)),
    ("/troupe.v1.Admin/SetSetting", Some(Role::Operator)),
    ("/troupe.v1.Admin/RegisterModel", Some(Role::Operator)),
    ("/troupe.v1.Admin/PushModel", Some(Role::Operator)),
    ("/troupe.v1.Admin/SetModelState", Some(Role::Operator)),
    ("/troupe.v1.Admin/RestartActor", Some(Role::Operator)),
    // admin: membership and cluster init.
    ("/troupe.v1.Admin/ClusterInit", Some(Role::Admin)),
    ("/troupe.v1.Admin/AddLearner", Some(Role::Admin)),
    ("/troupe.v1.Admin/Promote", Some(Role::Admin)),
    ("/troupe.v1.Admin/Remove", Some(Role::Admin)),
];

/// The role `path` needs: its row in [`TABLE`], or `admin` for anything unlisted.
pub fn required_role(path: &str) -> Option<Role> {
    TABLE
        .iter()
        .find(|(p, _)| *p == path)
        .map_or(Some(Role::Admin), |(_, role)| *role)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Every RPC the API port serves has a row, so none falls to `admin` by accident.
    #[test]
    fn every_api_rpc_is_in_the_table() {
        let set =
            prost_types::FileDescriptorSet::decode(troupe_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut seen = 0;
        for file in &set.file {
            for service in &file.service {
                let name = service.name();
                if name != "Admin" && name != "Inference" {
                    continue;
                }
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), name, method.name());
                    assert!(
                        TABLE.iter().any(|(p, _)| *p == path),
                        "{path} has no row in the RBAC table"
                    );
                    seen += 1;
                }
            }
        }
        assert!(seen >= 19, "only {seen} RPCs found in the descriptor set");
    }

    #[test]
    fn unlisted_paths_need_admin_and_health_is_public() {
        assert_eq!(required_role("/troupe.v1.Admin/Future"), Some(Role::Admin));
        assert_eq!(required_role("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            required_role("/troupe.v1.Inference/Embed"),
            Some(Role::Infer)
        );
        assert!(!Role::Infer.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Read));
    }
}
