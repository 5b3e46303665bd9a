#!/usr/bin/env bash
# Builds every fuzz target once, then runs each for SECONDS, one after another.
#
#   fuzz/run.sh SECONDS [TARGET...]     e.g. fuzz/run.sh 10   (CI)   fuzz/run.sh 180 rtcp
#
# Exits non-zero if any target crashes, panics, leaks, times out or fails to build. Works on
# a stable toolchain: cargo fuzz passes -Z flags (-Zsanitizer=address), which RUSTC_BOOTSTRAP=1
# lets a stable rustc accept. Set FUZZ_SANITIZER=none to build without AddressSanitizer.
# New corpus entries go to fuzz/corpus/TARGET (git-ignored), crashes to fuzz/artifacts/TARGET;
# the committed seeds in fuzz/seeds/TARGET are read, never written.
set -euo pipefail

secs=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
[[ $secs =~ ^[0-9]+$ ]] || { echo "SECONDS must be a whole number, got '$secs'" >&2; exit 2; }

cd "$(dirname "$0")"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-address}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

echo "== building ${targets[*]} (sanitizer: $sanitizer)"
cargo fuzz build -s "$sanitizer"

failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    corpora=("corpus/$t")
    [[ -d seeds/$t ]] && corpora+=("seeds/$t")
    log="artifacts/$t/run.log"
    echo "== $t: ${secs}s"
    start=$(date +%s)
    # The full output goes to the log; the console gets the lines that matter.
    set +e +o pipefail
    cargo fuzz run -s "$sanitizer" "$t" "${corpora[@]}" -- \
        -max_total_time="$secs" -timeout=30 -print_final_stats=1 2>&1 | tee "$log" |
        grep --line-buffered -E '^(#[0-9]+ +(INITED|DONE)|Done |==[0-9]+==ERROR|.*panicked at|SUMMARY|stat::number_of_executed_units)'
    rc=${PIPESTATUS[0]}
    set -e -o pipefail
    elapsed=$(( $(date +%s) - start ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    summary+=("$(printf '%-6s %4ss %12s execs  exit %s' "$t" "$elapsed" "${execs:-?}" "$rc")")
    if [[ $rc -ne 0 ]]; then
        failed+=("$t")
        echo "!! $t failed (exit $rc); log: fuzz/$log; inputs: fuzz/artifacts/$t/" >&2
    fi
done

echo "== summary"
printf '%s\n' "${summary[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "all ${#targets[@]} fuzz targets ran ${secs}s without a crash"
