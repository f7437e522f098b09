//! Compiles `proto/` (kvrouter's gRPC API and the Envoy ext_proc / gRPC
//! health subsets it serves) with protox, so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/kvtier/router/v1/router.proto",
        "proto/envoy/service/ext_proc/v3/external_processor.proto",
        "proto/grpc/health/v1/health.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
