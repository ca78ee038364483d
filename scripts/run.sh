#!/usr/bin/env bash
# Runs the homeserver on its embedded default (SQLite) with config and data in ./data, and beside
# it the logging service (crates/switchboard-logger): join any #logged_<name>:<server> alias and
# the service creates the room; every message there is appended to data/logged.jsonl.
# First run: creates the config, signing key and the service's registration.
# SERVER_NAME, PORT and LOGGER_PORT change the defaults.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

server_name="${SERVER_NAME:-localhost}"
port="${PORT:-8008}"
logger_port="${LOGGER_PORT:-9000}"
cargo build --release -p switchboard -p switchboard-logger
mkdir -p data
if [[ ! -f data/logger.yaml ]]; then
    target/release/switchboard-logger generate-registration \
        --url "http://127.0.0.1:$logger_port" --server-name "$server_name" --output data/logger.yaml
fi
if [[ ! -f data/homeserver.yaml ]]; then
    target/release/switchboard generate-config --server-name "$server_name" --data-dir data \
        --port "$port" --app-service logger.yaml --open-registration
fi

# The service waits for the homeserver to come up, and stops with this script.
target/release/switchboard-logger --registration data/logger.yaml \
    --homeserver "http://127.0.0.1:$port" --server-name "$server_name" \
    --listen "127.0.0.1:$logger_port" --log-file data/logged.jsonl --txn-file data/logger-txns &
logger=$!
trap 'kill "$logger" 2>/dev/null || true' EXIT
target/release/switchboard --config data/homeserver.yaml
