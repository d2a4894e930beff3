//! Lets the worker binary find libtorch at run time without LD_LIBRARY_PATH: torch-sys publishes
//! the folder holding libtorch to crates that depend on it directly (as DEP_TCH_LIBTORCH_LIB).
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
