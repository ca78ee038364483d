#!/usr/bin/env bash
# Create (or reuse) the interop test venv at target/interop-venv and install
# tests/interop/requirements.txt into it. Idempotent: the venv is reused when
# the hash of requirements.txt (and the Python version) is unchanged.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/target/interop-venv"
req="$here/requirements.txt"
stamp="$venv/.requirements.sha256"
python="${PYTHON:-python3}"

want="$( { sha256sum "$req" | cut -d' ' -f1; "$python" --version; } 2>&1 | sha256sum | cut -d' ' -f1)"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "interop venv up to date: $venv"
    exit 0
fi

echo "creating interop venv: $venv"
rm -rf "$venv"
mkdir -p "$root/target"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
echo "interop venv ready: $venv"
