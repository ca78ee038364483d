#!/usr/bin/env bash
# Run the matrix-nio interop suite against target/debug/switchboard
# (or $SWITCHBOARD_BIN). Extra arguments are passed to pytest.
# SWITCHBOARD_TEST_DATABASE=postgres puts each Switchboard server on a fresh PostgreSQL database
# (SWITCHBOARD_TEST_POSTGRES, as for the Rust tests; see conftest.py).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
bash tests/interop/setup.sh
exec target/interop-venv/bin/python -m pytest tests/interop -v "$@"
