//! Generates the Rust code for proto/car/v1 into the directory given as the
//! only argument (clients/gen.sh passes carsvc/src/gen, or a temporary
//! directory for --check). protoc is whatever `PROTOC` names; gen.sh points it
//! at clients/protoc, the same protoc 29.0 every language uses.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args_os().nth(1).map(PathBuf::from).ok_or("usage: carsvc-codegen OUT_DIR")?;
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../proto");
    let proto_root = proto_root.canonicalize()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(proto_root.join("car/v1"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    files.sort();
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .out_dir(&out)
        .compile_protos(&files, &[proto_root])?;
    Ok(())
}
