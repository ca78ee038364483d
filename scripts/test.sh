#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and integration tests, and the
# interop tests that drive the real binary with client libraries others wrote.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo test (unit + integration against the real binary)"
cargo test --workspace
echo "==> interop tests (matrix-nio, mautrix-python, matrix-js-sdk)"
cargo build -p switchboard -p switchboard-logger -p switchboard-irc
bash tests/interop/run.sh
bash tests/interop/js/run.sh
