//! Builds the components the host bundles, so that `cargo run -p para-host`
//! works from a clean clone with no other step: the Azure broker
//! (`plugin/`) is compiled for wasm32-wasip2 and copied to `$OUT_DIR`, where
//! `include_bytes!` embeds it.

#[path = "../build-support/components.rs"]
mod components;

use std::path::PathBuf;

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let root = manifest.parent().unwrap_or(&manifest).to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into()));
    // Relative paths (to this package), so a build in another checkout
    // sharing the target directory watches its own sources.
    for watched in [
        "../plugin/src",
        "../plugin/Cargo.toml",
        "../Cargo.toml",
        "../wit",
        "../build-support",
    ] {
        println!("cargo:rerun-if-changed={watched}");
    }
    let dir = components::build_components(&root, &out, &["azure-broker"]);
    let (wasm, dest) = (dir.join("azure_broker.wasm"), out.join("azure_broker.wasm"));
    if let Err(e) = std::fs::copy(&wasm, &dest) {
        panic!("copying {} to {}: {e}", wasm.display(), dest.display());
    }
}
