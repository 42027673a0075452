#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (smtp, imap, pop3, line, proxy_header, client_hello) on the stable
# toolchain and prints how many inputs each ran clean.
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]     (defaults: all, 60 s each)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). No nightly: the
# targets are built with `--sanitizer none`, for which cargo-fuzz passes only
# stable rustc flags (SanitizerCoverage via -Cpasses/-Cllvm-args), so neither
# a nightly toolchain nor RUSTC_BOOTSTRAP is used. Environment:
#   FUZZ_SANITIZER   sanitizer to build with (default none; address etc. need
#                    a nightly toolchain: FUZZ_SANITIZER=address with
#                    RUSTUP_TOOLCHAIN=nightly)
#   FUZZ_NICE        niceness of the build and the run (default 10)
#   MTP_FUZZ_ALLOW   comma-separated invariant ids not to enforce, so that a
#                    known finding does not stop the search (fuzz/README.md)
#   FUZZ_ARGS        extra libFuzzer arguments
#
# libFuzzer's working corpus goes to fuzz/work/corpus/TARGET (ignored by git);
# the committed seeds in fuzz/corpus/TARGET are read, never written. A crash
# leaves its input in fuzz/artifacts/TARGET/ and makes the script exit 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

target=${1:-all}
seconds=${2:-60}
sanitizer=${FUZZ_SANITIZER:-none}
niceness=${FUZZ_NICE:-10}
all_targets=(smtp imap pop3 line proxy_header client_hello)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 2
fi
if [[ $target == all ]]; then
    targets=("${all_targets[@]}")
elif [[ " ${all_targets[*]} " == *" $target "* ]]; then
    targets=("$target")
else
    echo "usage: $0 [all|smtp|imap|pop3|line|proxy_header|client_hello] [SECONDS]" >&2
    exit 2
fi

echo "== building fuzz targets (sanitizer: $sanitizer, $(rustc --version))"
if [[ ${#targets[@]} -eq 1 ]]; then
    nice -n "$niceness" cargo fuzz build --sanitizer "$sanitizer" "${targets[0]}"
else
    nice -n "$niceness" cargo fuzz build --sanitizer "$sanitizer"
fi

mkdir -p work/logs
summary=()
status=0
for name in "${targets[@]}"; do
    mkdir -p "work/corpus/$name" "corpus/$name"
    log="work/logs/$name.log"
    echo "== fuzzing $name for ${seconds}s (log: fuzz/$log)"
    set +e
    # shellcheck disable=SC2086  # FUZZ_ARGS is a list of flags
    nice -n "$niceness" cargo fuzz run --sanitizer "$sanitizer" "$name" \
        "work/corpus/$name" "corpus/$name" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 ${FUZZ_ARGS:-} \
        >"$log" 2>&1
    code=$?
    set -e
    # libFuzzer's last line for a clean run: "#N	DONE   cov: ... corp: ...".
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
    runs=$(grep -E '^stat::number_of_executed_units:' "$log" | awk '{print $2}' | tail -n 1 || true)
    if [[ $code -eq 0 && -n $done_line ]]; then
        summary+=("$name: ${runs:-?} inputs in ${seconds}s, clean  [${done_line//$'\t'/ }]")
    else
        status=1
        summary+=("$name: FAILED (exit $code) after ${runs:-?} inputs; see fuzz/$log and fuzz/artifacts/$name/")
        grep -E "invariant|panicked|ERROR: libFuzzer|Test unit written" "$log" | head -n 5 || true
    fi
done

echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$status"
