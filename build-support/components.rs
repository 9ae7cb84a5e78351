//! Shared by `host/build.rs` and `tests/build.rs`: builds wasm components
//! with a nested cargo in its own target directory (sharing the outer one
//! would deadlock on cargo's build lock).

use std::path::{Path, PathBuf};
use std::process::Command;

/// `<target>/<profile>/build/<pkg>-<hash>/out` → `<target>/wasm-components`.
pub fn component_target_dir(out: &Path) -> PathBuf {
    out.ancestors()
        .nth(4)
        .map(|t| t.join("wasm-components"))
        .unwrap_or_else(|| out.join("wasm-components"))
}

/// Builds `packages` for wasm32-wasip2 (release) and returns the directory
/// holding the `.wasm` files.
pub fn build_components(root: &Path, out: &Path, packages: &[&str]) -> PathBuf {
    let target_dir = component_target_dir(out);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .arg("--target-dir")
        .arg(&target_dir);
    for p in packages {
        cmd.args(["-p", p]);
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
        other => panic!(
            "building {packages:?} for wasm32-wasip2 failed ({other:?}). Is the target installed? \
             rust-toolchain.toml names it; `rustup target add wasm32-wasip2` adds it by hand."
        ),
    }
    target_dir.join("wasm32-wasip2").join("release")
}
