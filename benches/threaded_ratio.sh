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
# joined before the first benchmark), and the copy's own crate_ratio.sh runs with a
# build directory of its own. The key files the bench writes go to the temporary
# directory too, and leave with it.
#
# usage: benches/threaded_ratio.sh   (from any directory)
#   ANCHOR          the perf-anchor checkout (default: ../shared/perf-anchor beside
#                   the project)
#   THREADED_BUILD  the build directory (default: ~/.cache/tak-bench-threaded; never
#                   the one crate_ratio.sh uses, whose baselines it would overwrite)
#   HOT_GOAL        default 1.2, issue 17's guard rail (perf-anchor's own is 0.85);
#   COLD_GOAL and PASSES pass through to crate_ratio.sh.
set -euo pipefail
project=$(cd "$(dirname "$0")/.." && pwd)
anchor=$(cd "${ANCHOR:-$project/../shared/perf-anchor}" && pwd)
build=${THREADED_BUILD:-$HOME/.cache/tak-bench-threaded}
if [ "$(realpath -m "$build")" = "$(realpath -m "$HOME/.cache/tak-bench")" ]; then
  echo "THREADED_BUILD must not be crate_ratio.sh's own build directory" >&2
  exit 2
fi
copy=$(mktemp -d)
# The copy keeps perf-anchor's modes, read-only ones included.
trap 'chmod -R u+w "$copy" 2>/dev/null; rm -rf "$copy"' EXIT
(cd "$anchor" && tar --exclude=./target --exclude=./results -cf - .) | (cd "$copy" && tar -xf -)
chmod -R u+w "$copy"
micro="$copy/benches/micro.rs"
anchor_line='fn per_request_benches(c: &mut Criterion) {'
if [ ! -f "$micro" ] || ! grep -qF "$anchor_line" "$micro"; then
  echo "$anchor does not look like perf-anchor: no per_request_benches in benches/micro.rs" >&2
  exit 2
fi
python3 - "$micro" "$anchor_line" <<'PY'
import sys
path, anchor = sys.argv[1], sys.argv[2] + "\n"
text = open(path).read()
line = "    std::thread::spawn(|| {}).join().expect(\"a thread\"); // every column threaded\n"
open(path, "w").write(text.replace(anchor, anchor + line, 1))
PY
mkdir -p "$copy/tmp"
export BENCH_BUILD=$build TMPDIR=$copy/tmp HOT_GOAL=${HOT_GOAL:-1.2}
PROJECT=$project "$copy/scripts/crate_ratio.sh"
