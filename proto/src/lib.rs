//! The `kvtier.v1` API: messages and gRPC client/server stubs generated from
//! `proto/kvtier/v1/*.proto`, and the binary frames of the pool socket's
//! fast path ([`session`]).

#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("kvtier.v1");
}

pub mod session;
