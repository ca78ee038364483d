#!/usr/bin/env bash
# Create (or reuse) the test venvs and install their requirements:
#   target/interop-venv  <- tests/interop/requirements.txt (matrix-nio, mautrix-python, pytest, psycopg)
#   target/synapse-venv  <- tests/interop/requirements-synapse.txt (Synapse, the reference server)
# Idempotent: a venv is reused when the hash of its requirements (and the Python version) is
# unchanged. Also installs ngircd (Debian) for the IRC bridge tests. `setup.sh interop`,
# `setup.sh synapse` or `setup.sh irc` does just one part.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"

make_venv() {
    local venv="$root/target/$1" req="$2"
    local stamp="$venv/.requirements.sha256"
    local want
    want="$( { sha256sum "$req" | cut -d' ' -f1; "$python" --version; } 2>&1 | sha256sum | cut -d' ' -f1)"
    if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "venv up to date: $venv"
        return
    fi
    echo "creating venv: $venv"
    rm -rf "$venv"
    mkdir -p "$root/target"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
    echo "$want" > "$stamp"
    echo "venv ready: $venv"
}

# The IRC server the IRC bridge's tests talk to, from Debian's packages.
ensure_ngircd() {
    if [[ -x /usr/sbin/ngircd ]] || command -v ngircd >/dev/null; then
        echo "ngircd present"
        return
    fi
    local sudo=""
    [[ "$(id -u)" == 0 ]] || sudo="sudo"
    echo "installing ngircd"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq ngircd >/dev/null
}

which="${1:-all}"
if [[ "$which" == all || "$which" == interop ]]; then
    make_venv interop-venv "$here/requirements.txt"
fi
if [[ "$which" == all || "$which" == synapse ]]; then
    make_venv synapse-venv "$here/requirements-synapse.txt"
fi
if [[ "$which" == all || "$which" == irc ]]; then
    ensure_ngircd
fi
