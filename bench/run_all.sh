#!/bin/sh
# Run every sshfwup benchmark, then print the targets each one met or missed.
#
#   bench/run_all.sh [--quick] [--slow-cpu]     (as root: the simulated device uses loop devices and mounts)
#
# --quick: smaller uploads (no 1 GiB), fewer rounds, shorter load. --slow-cpu: then lean, throughput
# and memory once more with the servers on one core throttled to 20 % (taskset + a cgroup CPU quota),
# the nearest thing to a board here.
#
# The figures go to stdout as the benchmarks run, and to bench/results/*.json. Benchmarks print
# figures; a missed target does not fail this script, a benchmark that cannot run does.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-"$here/../.venv/bin/python"}
quick=""
slow=""
for arg in "$@"; do
    case "$arg" in
        --quick) quick="--quick" ;;
        --slow-cpu) slow="yes" ;;
        *) echo "usage: $0 [--quick] [--slow-cpu]" >&2; exit 2 ;;
    esac
done

logs=$(mktemp -d "${TMPDIR:-/tmp}/sshfwup-bench.XXXXXX")
trap 'rm -rf "$logs"' EXIT
runs="lean throughput memory zero_downtime handoff front_kill preauth_flood delta"
if [ -n "$slow" ]; then
    runs="$runs lean:--slow-cpu throughput:--slow-cpu memory:--slow-cpu"
fi
failed=""
for run in $runs; do
    bench=${run%%:*}
    extra=""
    [ "$run" != "$bench" ] && extra=${run#*:}
    name=$bench${extra:+-slow}
    echo "=== $bench $quick $extra ($(date '+%H:%M:%S'), load average $(cut -d' ' -f1 /proc/loadavg))"
    # a pipeline's status is tee's: keep the benchmark's own
    # shellcheck disable=SC2086 # $quick and $extra are one flag or nothing
    { "$python" "$here/$bench.py" $quick $extra 2>&1; echo "$?" >"$logs/$name.status"; } | tee "$logs/$name.log"
    if [ "$(cat "$logs/$name.status")" != 0 ]; then
        failed="$failed $name"
    fi
    echo
done

echo "=== summary $quick${slow:+ --slow-cpu}"
for run in $runs; do
    bench=${run%%:*}
    name=$bench
    [ "$run" != "$bench" ] && name=$bench-slow
    grep -h '^target ' "$logs/$name.log" || true
done
if [ -n "$failed" ]; then
    echo "did not run to the end:$failed"
    exit 1
fi
echo "results: $here/results/"
