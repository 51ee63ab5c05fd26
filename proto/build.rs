//! Compiles the protocol with protox (a protobuf compiler in Rust, so no protoc is
//! needed), then generates the prost messages, the tonic service and the proto3 JSON
//! mapping (pbjson) that gives every message its YAML/JSON form.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] =
    &["llmops/worker/v1/common.proto", "llmops/worker/v1/assignment.proto", "llmops/worker/v1/gateway.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=llmops");
    let descriptors = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let encoded = descriptors.encode_to_vec();
    std::fs::write(out_dir.join("llmops_descriptor.bin"), &encoded)?;

    tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(descriptors)?;

    pbjson_build::Builder::new().register_descriptors(&encoded)?.build(&[".llmops"])?;
    Ok(())
}
