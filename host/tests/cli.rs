//! The `para-host` command line, run as a user runs it.
//!
//! Besides what it checks, this file makes `cargo test --workspace` build
//! the `para-host` binary, which the integration tests under `tests/` start.

use std::process::Command;

fn para_host() -> Command {
    Command::new(env!("CARGO_BIN_EXE_para-host"))
}

#[test]
fn broker_check_refuses_a_file_that_is_not_a_component() {
    let dir = std::env::temp_dir().join(format!("para-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bogus = dir.join("bogus.wasm");
    std::fs::write(&bogus, b"not wasm at all").unwrap();
    let out = para_host()
        .args(["broker", "check"])
        .arg(&bogus)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a valid wasm component"), "{err}");
    let missing = para_host()
        .args(["broker", "check"])
        .arg(dir.join("nope.wasm"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read component"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_lists_the_commands() {
    let out = para_host().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "app", "broker"] {
        assert!(text.contains(cmd), "{text}");
    }
}
