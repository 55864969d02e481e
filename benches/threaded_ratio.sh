#!/usr/bin/env bash
# perf-anchor's crate_ratio.sh, with every column measured in a process that has
# started a thread, as the crate's column always is (perf-anchor builds a tokio
# runtime for it). glibc's malloc takes its locked paths for good once a process has
# a second thread, and the request's own frees (its headers, its extensions) then
# cost more: without this, the floor and the reference are timed before any thread
# exists and the crate after, and the difference is charged to the crate.
#
# Nothing in ../shared/perf-anchor is changed: it is copied to a temporary
# directory, one line is added to the copy's micro bench (a thread started and
# joined before the first benchmark), and the copy's own crate_ratio.sh runs with its
# own build directory.
#
# usage (from the project root): benches/threaded_ratio.sh
#        ANCHOR=<perf-anchor checkout> (default ../shared/perf-anchor);
#        HOT_GOAL, COLD_GOAL and PASSES pass through.
set -euo pipefail
project=$(cd "$(dirname "$0")/.." && pwd)
anchor=$(cd "${ANCHOR:-$project/../shared/perf-anchor}" && pwd)
copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
(cd "$anchor" && tar --exclude=./target --exclude=./results -cf - .) | (cd "$copy" && tar -xf -)
python3 - "$copy/benches/micro.rs" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
anchor = "fn per_request_benches(c: &mut Criterion) {\n"
if anchor not in text:
    sys.exit("perf-anchor's micro bench has changed: no per_request_benches to patch")
line = "    std::thread::spawn(|| {}).join().expect(\"a thread\"); // every column threaded\n"
open(path, "w").write(text.replace(anchor, anchor + line, 1))
PY
export BENCH_BUILD=${BENCH_BUILD:-$HOME/.cache/tak-bench-threaded}
PROJECT=$project "$copy/scripts/crate_ratio.sh"
