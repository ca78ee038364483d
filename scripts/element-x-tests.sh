#!/usr/bin/env bash
# matrix-rust-sdk — the engine of Element X — against the real binary (tests/element-x). Its own
# workspace, built into target/element-x, so the server's build never compiles matrix-rust-sdk.
# Extra arguments go to `cargo test` (a test name to run one).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build -p switchboard
export SWITCHBOARD_BIN="$PWD/target/debug/switchboard"
export CARGO_TARGET_DIR="$PWD/target/element-x"
manifest=tests/element-x/Cargo.toml
cargo fmt --manifest-path "$manifest" -- --check
cargo clippy --manifest-path "$manifest" --all-targets --locked -- -D warnings
cargo test --manifest-path "$manifest" --locked -- "$@"
