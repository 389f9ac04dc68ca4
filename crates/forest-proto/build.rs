//! Compiles `proto/forest/v1/*.proto` with protox (a pure-Rust protobuf compiler), so building
//! Forest never needs `protoc` installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with `env!`: a build-script binary compiled in one checkout can be
    // reused for another (a shared CARGO_TARGET_DIR, as in CI), and must not look in the old one.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "forest/v1/envelope.proto",
        "forest/v1/payments.proto",
        "forest/v1/mobility.proto",
        "forest/v1/commands.proto",
        "forest/v1/outputs.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
