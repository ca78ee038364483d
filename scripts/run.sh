#!/usr/bin/env bash
# Runs the homeserver on its embedded default (SQLite) with a config in ./data, creating the
# config and signing key on first run. Set SERVER_NAME or PORT to change the defaults.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

server_name="${SERVER_NAME:-localhost}"
port="${PORT:-8008}"
cargo build --release -p switchboard
if [[ ! -f data/homeserver.yaml ]]; then
    target/release/switchboard generate-config --server-name "$server_name" --data-dir data --port "$port"
fi
exec target/release/switchboard --config data/homeserver.yaml
