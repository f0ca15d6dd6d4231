//! Compiles the hand-written .proto files with protox (pure Rust: no system `protoc`).

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/envoy/service/ratelimit/v3/rls.proto",
    "proto/envoy/service/auth/v3/external_auth.proto",
    "proto/kuadrant/service/ratelimit/v1/ratelimit.proto",
    "proto/tally/v1/tally.proto",
    "proto/tally/v1/usage.proto",
    "proto/tally/v1/forward.proto",
    "proto/tally/v1/cluster.proto",
    "proto/tally/v1/raft.proto",
    "proto/tally/v1/models.proto",
    "proto/tally/v1/keys.proto",
    "proto/tally/v1/audit.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tally_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
