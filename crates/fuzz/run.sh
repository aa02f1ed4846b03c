#!/usr/bin/env bash
# Runs every cargo-fuzz target (or those named as arguments) for RUNS executions each, on a
# copy of its seed corpus and regression inputs, at most JOBS targets at a time, and prints
# per target: executions, exec/s, crashes. Exits 1 if any target crashed (naming the artifact)
# or was interrupted (SIGINT to its fuzzer stops it with its statistics).
#
#   crates/fuzz/run.sh                         # every target, 10 million runs each
#   RUNS=100000 crates/fuzz/run.sh frame       # a quick look at one target
#
# RUNS      executions per target (default 10000000)
# JOBS      targets run at once (default: the number of cores)
# SANITIZER cargo-fuzz sanitizer (default none: the code under test forbids unsafe, and
#           debug assertions, on in fuzz builds, catch overflows; `address` for ASan)
# WORK      where the corpus copies, logs and artifacts go (default: a new temporary folder,
#           kept afterwards)
# TIMEOUT   seconds one input may take before it counts as a hang (default 10)
set -euo pipefail
cd "$(dirname "$0")"

RUNS=${RUNS:-10000000}
JOBS=${JOBS:-$(nproc)}
SANITIZER=${SANITIZER:-none}
TIMEOUT=${TIMEOUT:-10}
WORK=${WORK:-$(mktemp -d -t natcall-fuzz.XXXXXX)}
mkdir -p "$WORK"

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

echo "building ${#targets[@]} targets (sanitizer: $SANITIZER); work folder $WORK" >&2
for t in "${targets[@]}"; do
    cargo +nightly fuzz build -s "$SANITIZER" "$t" >>"$WORK/build.log" 2>&1 ||
        { tail -40 "$WORK/build.log" >&2; exit 2; }
done

run_one() {
    local t=$1 dir="$WORK/$1"
    rm -rf "$dir"
    mkdir -p "$dir/corpus" "$dir/artifacts"
    cp corpus/"$t"/* "$dir/corpus/"
    if [ -d "regressions/$t" ]; then cp regressions/"$t"/* "$dir/corpus/" 2>/dev/null || true; fi
    local start rc=0
    start=$(date +%s)
    cargo +nightly fuzz run -s "$SANITIZER" "$t" "$dir/corpus" -- \
        -runs="$RUNS" -timeout="$TIMEOUT" -print_final_stats=1 \
        -artifact_prefix="$dir/artifacts/" >"$dir/log" 2>&1 || rc=$?
    echo "$rc $(( $(date +%s) - start ))" >"$dir/status"
}

running=0
for t in "${targets[@]}"; do
    [ -d "corpus/$t" ] || { echo "no seed corpus for $t" >&2; exit 2; }
    if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
    echo "fuzzing $t" >&2
    run_one "$t" &
    running=$((running + 1))
done
wait

failed=0
printf '%-16s %12s %10s %8s %8s  %s\n' target executions exec/s seconds crashes result
for t in "${targets[@]}"; do
    dir="$WORK/$t"
    read -r rc secs <"$dir/status"
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$dir/log" | tail -1)
    # libFuzzer reports 0 exec/s for runs under a second.
    if [ "${rate:-0}" = 0 ] && [ -n "$execs" ]; then rate="~$((execs / (secs > 0 ? secs : 1)))"; fi
    mapfile -t artifacts < <(find "$dir/artifacts" -type f | sort)
    result=ok
    if [ ${#artifacts[@]} -gt 0 ]; then
        result="CRASHED (log $dir/log)"; failed=1
    elif grep -q 'libFuzzer: run interrupted' "$dir/log"; then
        result="interrupted before $RUNS runs"; failed=1
    elif [ "$rc" -ne 0 ]; then
        result="FAILED (exit $rc; log $dir/log)"; failed=1
    fi
    printf '%-16s %12s %10s %8s %8s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "$secs" "${#artifacts[@]}" "$result"
    for a in "${artifacts[@]}"; do echo "    artifact: $a"; done
done
echo "logs, grown corpora and artifacts: $WORK"
exit "$failed"
