//! Builds the fixture components the integration tests load
//! (`tests/fixtures/*`) for wasm32-wasip2, and tells the tests where they
//! are through `FIXTURES_DIR`.

use std::path::{Path, PathBuf};
use std::process::Command;

const FIXTURES: &[&str] = &["fixture-loopback", "fixture-hostile", "fixture-incomplete"];

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let root = manifest.parent().unwrap_or(&manifest).to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into()));
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("fixtures").display()
    );
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    let target_dir = out
        .ancestors()
        .nth(4)
        .map(|t| t.join("wasm-components"))
        .unwrap_or_else(|| out.join("wasm-components"));
    build(&root, &target_dir);
    let dir = target_dir.join("wasm32-wasip2").join("release");
    println!("cargo:rustc-env=FIXTURES_DIR={}", dir.display());
}

fn build(root: &Path, target_dir: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .arg("--target-dir")
        .arg(target_dir);
    for f in FIXTURES {
        cmd.args(["-p", f]);
    }
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
    match cmd.status() {
        Ok(s) if s.success() => {}
        other => panic!("building the fixture components failed: {other:?}"),
    }
}
