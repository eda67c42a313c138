#!/usr/bin/env bash
# Benchmarks release-tasks against what it replaces. Run from anywhere: `bash bench/run.sh`.
# Needs hyperfine and GNU time (Debian packages `hyperfine` and `time`; installed if missing and root).
# Prints every figure and its ratio to what release-tasks replaces; numbers are for this machine only.
# BIN=path/to/release-tasks skips the build and measures that binary; RUNS, THROUGHPUT_RUNS and
# ROUNDS (default 5) trade time for steadier figures.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null || { [ "$(id -u)" = 0 ] && apt-get install -y -qq "$2" >/dev/null; }; }
need hyperfine hyperfine
[ -x /usr/bin/time ] || need /usr/bin/time time

target=x86_64-unknown-linux-musl
if [ -n "${BIN:-}" ]; then
  bin=$(realpath "$BIN")
elif rustup target list --installed 2>/dev/null | grep -q "$target" && command -v musl-gcc >/dev/null; then
  # The binary that ships: built, trimmed and checked by the same script as the release tarballs.
  scripts/build-static "$target" >/dev/null
  bin=$PWD/target/$target/release/release-tasks
else
  cargo build --release --locked -q
  bin=$PWD/target/release/release-tasks
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The repository's own release.toml (the seed script's three tasks, with the same gates) and the seed
# script; both run `bundle exec rails ...`, which a stub `bundle` first on PATH answers with exit 0.
cp release.toml bench/release-tasks.sh "$work/"
mkdir "$work/stub"
printf '#!/bin/sh\nexit 0\n' > "$work/stub/bundle"
chmod +x "$work/stub/bundle"
export PATH="$work/stub:$PATH"
cd "$work"
gates=(RUN_MIGRATIONS_DURING_RELEASE SEED_DB_DURING_RELEASE CLEAR_CACHE_DURING_RELEASE)
unset "${gates[@]}"

echo "# release-tasks benchmarks"
echo
echo "binary: $bin ($(stat -c %s "$bin") bytes)"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ), load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -sr)"
echo

median() { # hyperfine JSON -> "median min" in ms
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; print("%.3f:%.3f" % (r["median"]*1000, r["min"]*1000))' "$1"
}
run() { # name, command...
  local name=$1; shift
  hyperfine -N --warmup 20 --runs "${RUNS:-200}" --export-json "$work/$name.json" "$@" >/dev/null 2>&1
  median "$work/$name.json"
}

# A shared machine is noisy: alternate the two commands in rounds and report the medians, and the
# median of the per-round ratios.
compare() { # label, command A, command B
  local label=$1 a=$2 b=$3 ra=() rb=()
  for round in $(seq "${ROUNDS:-5}"); do
    ra+=("$(run "a$round" "$a")")
    rb+=("$(run "b$round" "$b")")
  done
  python3 - "$label" "${ra[*]}" "${rb[*]}" <<'PY'
import statistics, sys
label, a, b = sys.argv[1:]
a = [tuple(map(float, x.split(":"))) for x in a.split()]
b = [tuple(map(float, x.split(":"))) for x in b.split()]
ratios = [x[0] / y[0] for x, y in zip(a, b)]
med = lambda xs: statistics.median(xs)
amin, bmin = min(x[1] for x in a), min(y[1] for y in b)
print(f"{label}: release-tasks {med([x[0] for x in a]):.2f} ms, bash release-tasks.sh {med([y[0] for y in b]):.2f} ms; "
      f"ratio of medians {med(ratios):.2f} (median of {len(ratios)} rounds), ratio of minimums {amin / bmin:.2f} ({amin:.2f} / {bmin:.2f} ms)")
PY
}

echo "## Start-up: every gate off"
compare "start-up" "$bin" "bash release-tasks.sh"
echo

echo "## Three tasks: every gate on, each task the stub \`bundle\`"
export "${gates[@]/%/=true}"
RUNS=${RUNS:-100} compare "three tasks" "$bin" "bash release-tasks.sh"
unset "${gates[@]}"
echo

echo "## Context switches per task (voluntary, GNU time %w, median of 15 runs; stdout and stderr a pipe)"
# 1 and 11 tasks of /bin/true each way, so that what a run costs once (start-up, the release's log
# lines) cancels out: (switches of 11 - switches of 1) / 10 per task. Everything the process tree
# did counts, the tasks included.
switches() { # command... -> median voluntary context switches
  for _ in $(seq 15); do /usr/bin/time -f %w -o "$work/cs" "$@" 2>&1 | cat >/dev/null; cat "$work/cs"; done | sort -n | sed -n 8p
}
for n in 1 11; do
  : > "tasks$n.toml"; : > "tasks$n.sh"
  for i in $(seq "$n"); do
    printf '[tasks.t%d]\nrun = ["/bin/true"]\n' "$i" >> "tasks$n.toml"
    echo /bin/true >> "tasks$n.sh"
  done
done
a1=$(switches "$bin" --config tasks1.toml); a11=$(switches "$bin" --config tasks11.toml)
b1=$(switches bash tasks1.sh); b11=$(switches bash tasks11.sh)
echo "release-tasks: $a1 for 1 task, $a11 for 11, $(awk "BEGIN { printf \"%.1f\", ($a11 - $a1) / 10 }") per task; bash: $b1 for 1, $b11 for 11, $(awk "BEGIN { printf \"%.1f\", ($b11 - $b1) / 10 }") per task"
echo

echo "## Output throughput: ~250 MB of 100-byte lines through one pipe"
# `yes` is stopped by SIGPIPE when head has enough, which pipefail would count as a failure.
(yes "$(printf '%099d' 0 | cut -c1-99)" || true) | head -c 250000000 > big.txt
printf '[tasks.out]\nrun = ["cat", "big.txt"]\n' > throughput.toml
RUNS=${THROUGHPUT_RUNS:-5}
hyperfine -N --warmup 1 --runs "$RUNS" --export-json "$work/tp.json" \
  "sh -c '$bin --config throughput.toml >/dev/null 2>&1'" \
  "sh -c \"cat big.txt | sed 's/^/out | /' >/dev/null\"" \
  "sh -c 'cat big.txt | cat >/dev/null'" >/dev/null 2>&1
python3 - "$work/tp.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
names = ["release-tasks", "sed 's/^/out | /'", "cat"]
for name, x in zip(names, r):
    print(f"{name}: {x['median']*1000:.0f} ms ({250/x['median']:.0f} MB/s)")
print(f"release-tasks / sed: {r[0]['median']/r[1]['median']:.2f}; release-tasks / cat: {r[0]['median']/r[2]['median']:.2f}")
PY
echo

echo "## Peak memory: maximum resident set size (GNU time), median of 5 runs"
rss() { # command... -> KiB
  for _ in 1 2 3 4 5; do /usr/bin/time -f %M "$@" 2>&1 >/dev/null | tail -n1; done | sort -n | sed -n 3p
}
ratio() { awk "BEGIN { printf \"%.2f\", $1 / $2 }"; }
a=$(rss "$bin"); b=$(rss bash release-tasks.sh)
echo "gates off: release-tasks $a KiB, bash release-tasks.sh $b KiB; ratio $(ratio "$a" "$b")"
export "${gates[@]/%/=true}"
a=$(rss "$bin"); b=$(rss bash release-tasks.sh)
echo "three tasks: release-tasks $a KiB, bash release-tasks.sh $b KiB; ratio $(ratio "$a" "$b")"
unset "${gates[@]}"
a=$(rss "$bin" --config throughput.toml); b=$(rss sh -c "sed 's/^/out | /' big.txt")
echo "250 MB of output: release-tasks $a KiB, sed $b KiB; ratio $(ratio "$a" "$b")"
