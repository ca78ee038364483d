#!/usr/bin/env bash
# Run the matrix-js-sdk interop test against target/debug/switchboard (or $SWITCHBOARD_BIN).
# Installs the locked packages (package-lock.json) into tests/interop/js/node_modules with
# `npm ci`, skipped when the lock file and the Node.js version are unchanged since the last install.
# SWITCHBOARD_TEST_DATABASE=postgres runs the server on a fresh PostgreSQL database (see test_js_sdk.mjs).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
stamp="$here/node_modules/.package-lock.sha256"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "node and npm are needed for the matrix-js-sdk interop test (Node.js >= 20)" >&2
    exit 1
fi

want="$( { sha256sum "$here/package-lock.json" | cut -d' ' -f1; node --version; } 2>&1 | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "matrix-js-sdk packages up to date: $here/node_modules"
else
    echo "installing matrix-js-sdk packages: $here/node_modules"
    (cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$want" > "$stamp"
fi

cd "$root"
export SWITCHBOARD_BIN="${SWITCHBOARD_BIN:-$root/target/debug/switchboard}"
exec node "$here/test_js_sdk.mjs" "$@"
