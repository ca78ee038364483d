#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and integration tests, and the
# interop tests that drive the real binary with client libraries others wrote.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# The federation tests' peers first: Synapse (from PyPI, into target/synapse-venv; the SDK's tests
# run against it too), matrix-nio (target/interop-venv: the end-to-end encryption tests across
# servers drive it), ngircd and the IRC bridge's binary. Where they are required, a test that
# cannot find one fails instead of skipping.
echo "==> installing the federation tests' peers (tests/interop/setup.sh synapse, interop, irc)"
bash tests/interop/setup.sh synapse
bash tests/interop/setup.sh interop
bash tests/interop/setup.sh irc
cargo build -p switchboard -p switchboard-logger -p switchboard-irc
export SWITCHBOARD_PEERS_REQUIRED=1
echo "==> cargo test (unit + integration against the real binary, SQLite)"
cargo test --workspace
# The same suites on PostgreSQL (127.0.0.1:5432, trust auth; SWITCHBOARD_TEST_POSTGRES to change):
# every test server gets a fresh database, dropped afterwards. Only the crates that reach the
# homeserver's database run again.
echo "==> cargo test (the homeserver's crates again, PostgreSQL)"
SWITCHBOARD_TEST_DATABASE=postgres cargo test -p switchboard-store -p switchboard-core -p switchboard
echo "==> Element X's engine (matrix-rust-sdk, scripts/element-x-tests.sh)"
bash scripts/element-x-tests.sh
echo "==> interop tests (matrix-nio, mautrix-python, matrix-js-sdk) on SQLite, then PostgreSQL"
for database in sqlite postgres; do
    echo "==> interop on $database"
    SWITCHBOARD_TEST_DATABASE=$database bash tests/interop/run.sh
    SWITCHBOARD_TEST_DATABASE=$database bash tests/interop/js/run.sh
done
# Every cargo-fuzz target for 30 s from its checked-in corpus, after replaying the checked-in crash
# regressions (nightly toolchain; cargo-fuzz is installed into target/cargo-fuzz on first use).
echo "==> fuzzing (scripts/fuzz.sh, ${FUZZ_SECONDS:-30} s per target)"
bash scripts/fuzz.sh
