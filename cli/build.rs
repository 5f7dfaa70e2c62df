//! Compiles the etcd client subset (proto/etcd/kv_subset.proto) that `troupe bench raft
//! --etcd` drives, with the vendored protoc: no system install needed. Client stubs only.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let etcd = ["proto/etcd/kv_subset.proto"];
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&etcd, &["proto"])?;
    for proto in etcd {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
