#!/bin/sh
# Run every sshfwup benchmark, then print the targets each one met or missed.
#
#   bench/run_all.sh [--quick]        (as root: the simulated device uses loop devices and mounts)
#
# The figures go to stdout as the benchmarks run, and to bench/results/*.json. Benchmarks print
# figures; a missed target does not fail this script, a benchmark that cannot run does.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-"$here/../.venv/bin/python"}
quick=""
case "${1:-}" in
    --quick) quick="--quick" ;;
    "") ;;
    *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac

logs=$(mktemp -d "${TMPDIR:-/tmp}/sshfwup-bench.XXXXXX")
trap 'rm -rf "$logs"' EXIT
failed=""
for bench in throughput memory zero_downtime preauth_flood delta; do
    echo "=== $bench $quick ($(date '+%H:%M:%S'), load average $(cut -d' ' -f1 /proc/loadavg))"
    # a pipeline's status is tee's: keep the benchmark's own
    { "$python" "$here/$bench.py" $quick 2>&1; echo "$?" >"$logs/$bench.status"; } | tee "$logs/$bench.log"
    if [ "$(cat "$logs/$bench.status")" != 0 ]; then
        failed="$failed $bench"
    fi
    echo
done

echo "=== summary $quick"
for bench in throughput memory zero_downtime preauth_flood delta; do
    grep -h '^target ' "$logs/$bench.log" || true
done
if [ -n "$failed" ]; then
    echo "did not run to the end:$failed"
    exit 1
fi
echo "results: $here/results/"
