//! With the `cuda` feature, `FLIPSKETCH_CUDA_RPATH` (set by tools/gpu/setup-cuda.sh to the
//! CUDA libraries it installed) becomes the binary's run path, so that it finds cuBLAS, cuRAND
//! and NVRTC there without LD_LIBRARY_PATH. Nothing changes without it.
fn main() {
    println!("cargo:rerun-if-env-changed=FLIPSKETCH_CUDA_RPATH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        if let Ok(dir) = std::env::var("FLIPSKETCH_CUDA_RPATH") {
            if !dir.is_empty() {
                println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{dir}");
            }
        }
    }
}
