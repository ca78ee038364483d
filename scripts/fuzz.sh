#!/usr/bin/env bash
# Fuzzing with cargo-fuzz (libFuzzer, AddressSanitizer, debug assertions): replays the checked-in
# crash regressions (fuzz/regressions/<target>/), then fuzzes every target — or the ones named as
# arguments — for FUZZ_SECONDS each (default 30) from its checked-in corpus (fuzz/corpus/<target>/).
# Fails if any target crashes, hangs (an input over 10 s) or goes over 2 GB of memory; the input
# that did it is left in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh                              # every target, 30 s each (CI)
#   FUZZ_SECONDS=600 scripts/fuzz.sh irc_line    # one target, 10 minutes
#   FUZZ_UPDATE_CORPUS=1 scripts/fuzz.sh         # then merge what was found into fuzz/corpus/
#                                                # and minimise it (cargo fuzz cmin)
#
# Needs rustup (a nightly toolchain is installed if missing) and a C compiler; cargo-fuzz is
# installed into target/cargo-fuzz on first use. The fuzz crate is its own workspace, built into
# fuzz/target: it never shares a build with the main workspace.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

seconds=${FUZZ_SECONDS:-30}
cargo_fuzz_version=0.13.2
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$root/fuzz/target}
# libFuzzer's limits: an input running over 10 s is a hang; more than 2 GB of memory is a failure.
limits=(-rss_limit_mb=2048 -timeout=10)

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "==> installing the nightly toolchain (cargo-fuzz needs it for the sanitizers)"
    rustup toolchain install nightly --profile minimal
fi
cargo_fuzz=$root/target/cargo-fuzz/bin/cargo-fuzz
if ! "$cargo_fuzz" --version 2>/dev/null | grep -q " $cargo_fuzz_version\$"; then
    echo "==> installing cargo-fuzz $cargo_fuzz_version into target/cargo-fuzz"
    cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked --force --root "$root/target/cargo-fuzz"
fi
fuzz() { (cd "$root/fuzz" && PATH="$root/target/cargo-fuzz/bin:$PATH" cargo +nightly fuzz "$@"); }

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(fuzz list)
fi

echo "==> building the fuzz targets"
fuzz build

failed=()
for target in "${targets[@]}"; do
    regressions=$root/fuzz/regressions/$target
    if [ -d "$regressions" ] && [ -n "$(ls -A "$regressions")" ]; then
        echo "==> $target: replaying $(ls "$regressions" | wc -l) regression input(s)"
        if ! fuzz run "$target" "$regressions" -- -runs=0 "${limits[@]}"; then
            failed+=("$target (regression)")
            continue
        fi
    fi
    # New inputs go to a scratch corpus; the checked-in one is only read.
    scratch=$CARGO_TARGET_DIR/corpus/$target
    mkdir -p "$scratch" "$root/fuzz/corpus/$target"
    # Tokens of the input's language (JSON, YAML, IRC) and edge values, for the mutator.
    dict=()
    if [ -f "$root/fuzz/dicts/$target.dict" ]; then
        dict=(-dict="$root/fuzz/dicts/$target.dict")
    fi
    echo "==> $target: fuzzing for ${seconds}s"
    if ! fuzz run "$target" "$scratch" "$root/fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 "${dict[@]}" "${limits[@]}"; then
        failed+=("$target")
        continue
    fi
    if [ "${FUZZ_UPDATE_CORPUS:-0}" = 1 ]; then
        echo "==> $target: merging new inputs into fuzz/corpus/$target and minimising"
        cp -n "$scratch"/* "$root/fuzz/corpus/$target/" 2>/dev/null || true
        # Edges only (not hit counts), so what is checked in stays small.
        fuzz cmin "$target" "$root/fuzz/corpus/$target" -- -use_counters=0 "${limits[@]}"
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "==> FAILED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "==> fuzzing passed: ${targets[*]} (${seconds}s each)"
