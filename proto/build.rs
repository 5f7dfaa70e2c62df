//! Compiles proto/troupe/v1/*.proto with the vendored protoc: no system install needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "troupe/v1/inference.proto",
        "troupe/v1/raft.proto",
        "troupe/v1/admin.proto",
        "troupe/v1/artifacts.proto",
        "troupe/v1/peer.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("troupe_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
