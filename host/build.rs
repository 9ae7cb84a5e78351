//! Builds the components the host bundles, so that `cargo run -p para-host`
//! works from a clean clone with no other step.
//!
//! The Azure broker (`plugin/`) is compiled for wasm32-wasip2 by a nested
//! cargo with its own target directory (sharing the outer one would
//! deadlock on cargo's build lock), then copied to `$OUT_DIR` where
//! `include_bytes!` embeds it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().unwrap_or(&manifest).to_path_buf();
    let out = PathBuf::from(env("OUT_DIR"));
    for watched in ["plugin/src", "plugin/Cargo.toml", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let wasm = build_component(&root, &out, "azure-broker");
    let dest = out.join("azure_broker.wasm");
    if let Err(e) = std::fs::copy(&wasm, &dest) {
        panic!("copying {} to {}: {e}", wasm.display(), dest.display());
    }
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("cargo did not set {key}"))
}

/// `<target>/<profile>/build/<pkg>-<hash>/out` → `<target>/wasm-components`.
fn component_target_dir(out: &Path) -> PathBuf {
    out.ancestors()
        .nth(4)
        .map(|t| t.join("wasm-components"))
        .unwrap_or_else(|| out.join("wasm-components"))
}

fn build_component(root: &Path, out: &Path, package: &str) -> PathBuf {
    let target_dir = component_target_dir(out);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            package,
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running cargo to build {package}: {e}"));
    if !status.success() {
        panic!(
            "building the {package} component failed. Is the wasm32-wasip2 target installed? (rust-toolchain.toml names it; run `rustup target add wasm32-wasip2`)"
        );
    }
    let file = package.replace('-', "_");
    target_dir
        .join("wasm32-wasip2")
        .join("release")
        .join(format!("{file}.wasm"))
}
