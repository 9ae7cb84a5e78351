//! Builds the fixture components the integration tests load
//! (`tests/fixtures/*`) for wasm32-wasip2, and tells the tests where they
//! are through `FIXTURES_DIR`.

#[path = "../build-support/components.rs"]
mod components;

use std::path::PathBuf;

const FIXTURES: &[&str] = &["fixture-loopback", "fixture-hostile", "fixture-incomplete"];

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let root = manifest.parent().unwrap_or(&manifest).to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into()));
    // Relative paths (to this package), so a build in another checkout
    // sharing the target directory watches its own sources.
    for watched in ["fixtures", "../Cargo.toml", "../wit", "../build-support"] {
        println!("cargo:rerun-if-changed={watched}");
    }
    let dir = components::build_components(&root, &out, FIXTURES);
    println!("cargo:rustc-env=FIXTURES_DIR={}", dir.display());
}
