//! Code generated from `router/proto/` (module tree mirrors the packages).

#![allow(clippy::all, missing_docs)]

pub mod kvtier {
    pub mod router {
        pub mod v1 {
            tonic::include_proto!("kvtier.router.v1");
        }
    }
}

pub mod envoy {
    pub mod service {
        pub mod ext_proc {
            pub mod v3 {
                tonic::include_proto!("envoy.service.ext_proc.v3");
            }
        }
    }
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod r#type {
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
}

pub mod grpc {
    pub mod health {
        pub mod v1 {
            tonic::include_proto!("grpc.health.v1");
        }
    }
}
