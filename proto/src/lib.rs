//! The `kvtier.v1` API: messages and gRPC client/server stubs generated from
//! `proto/kvtier/v1/*.proto`.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("kvtier.v1");
}
