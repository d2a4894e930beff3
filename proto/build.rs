fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Prefer a protoc the user installed (PROTOC or PATH); fall back to the vendored one so the
    // coordinator builds on a bare machine.
    if std::env::var_os("PROTOC").is_none() && which("protoc").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/stagecoach.proto"], &["proto"])?;
    Ok(())
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}
