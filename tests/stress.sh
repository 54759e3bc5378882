#!/usr/bin/env bash
# Run raydet's Ray tests N times on a deliberately busy machine, so that a test whose outcome depends on when an
# asynchronous Ray event lands (an actor start, a report, a kill, a resource update) fails here and not in CI.
#
# Usage:
#   tests/stress.sh [ROUNDS] [PYTEST ARGS...]
#
#   ROUNDS       how many times to run the selection (default 5).
#   PYTEST ARGS  forwarded to pytest. A path or node id among them replaces the default `tests/`, e.g.
#                  tests/stress.sh 1 tests/test_failures.py
#                  tests/stress.sh 3 tests/test_ray_data.py::test_eval_keeps_order_and_every_image
#                  tests/stress.sh 2 -k "killed or decode"
#
# What runs: the tests that need Ray, chosen when each round collects (nothing to keep up to date): those whose
# fixtures include `ray_session` (directly or through another fixture) and those whose code starts a Ray instance
# itself (`ray.init(` or a `[..., "start", "--head", ...]` command in the test function).
# STRESS_ONLY_RAY=0 runs everything the arguments select instead.
#
# Beside them: one busy-spinning process per core (`nproc`, or STRESS_HOGS=K), started by this script and killed by
# PID when it exits (at the end, on an error, on Ctrl-C or SIGTERM). The hogs run at the niceness Ray gives its
# worker processes ($RAY_worker_niceness, Ray's default 15), so Ray's workers and actors share the cores with them
# on equal terms: every Ray step gets slower and lands later. STRESS_HOG_NICE=0 is harsher than any test deadline
# means to absorb: a nice-0 spinner gets ~28 times the CPU of a nice-15 Ray worker, so a 1-minute Ray test then
# takes most of half an hour.
#
# Output: one line per round (`round k/N: passed|failed ... (S s)`, with pytest's summary), then
# `stress: P/N rounds passed`; exit status 1 if any round failed. Each round's full pytest output is kept in
# STRESS_LOG_DIR (default: a new folder under /tmp, printed at the start).
#
# Environment: STRESS_TIMEOUT=S interrupts a round after S seconds like Ctrl-C (pytest then prints the failures so
# far and where it stood; the round counts as failed; default: no limit).
# Ray: the rounds get a private RAY_TMPDIR (Ray's session folders; kept, and printed, when a round failed), so the
# tests' `ray.init()` starts their own instance even when a `ray start` cluster of someone else runs on the host.
# Not isolated: a Ray dashboard of another instance on port 8265. The tests' Ray (no dashboard) still publishes
# 127.0.0.1:8265 as its State API address, and Ray Train's PlacementGroupCleaner, asking that server whether our
# run's controller is alive and hearing "no such actor", removes the run's placement group: its workers die
# mid-run. The script says so at the start when something listens on 8265.
# Python: the active environment's ($VIRTUAL_ENV), else the repository's .venv, else python3 on PATH.
# Runs from the repository root (Ray's workers import test helpers by the path Ray was started from).
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

ROUNDS=5
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
    ROUNDS=$1
    shift
fi
if [ "$ROUNDS" -lt 1 ]; then
    echo "stress: ROUNDS must be at least 1" >&2
    exit 2
fi

if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PYTHON=$VIRTUAL_ENV/bin/python
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PYTHON=$ROOT/.venv/bin/python
else
    PYTHON=$(command -v python3) || { echo "stress: no python found" >&2; exit 2; }
fi

# A path or node id among the arguments replaces the default test folder.
TARGETS=(tests)
for arg in "$@"; do
    if [ -e "${arg%%::*}" ]; then
        TARGETS=()
        break
    fi
done

LOG_DIR=${STRESS_LOG_DIR:-$(mktemp -d /tmp/raydet-stress.XXXXXX)}
mkdir -p "$LOG_DIR" || exit 2
PLUGIN_DIR=$(mktemp -d /tmp/raydet-stress-plugin.XXXXXX) || exit 2
RAY_TMP=$(mktemp -d /tmp/rst.XXXXXX) || exit 2  # short: Ray's socket paths under it must fit in 107 characters
OTHER_RAY=$(pgrep -d ' ' -f '[g]cs_server' || true)

HOG_PIDS=()
cleanup() {
    local pid
    for pid in "${HOG_PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${HOG_PIDS[@]}"; do
        wait "$pid" 2>/dev/null
    done
    rm -rf "$PLUGIN_DIR"
    if [ "${PASSED:-0}" -eq "$ROUNDS" ] || [ -z "$(ls -A "$RAY_TMP" 2>/dev/null)" ]; then
        rm -rf "$RAY_TMP"
    else
        echo "stress: Ray's session folders (logs) of this run: $RAY_TMP/ray"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# pytest plugin: keep only the tests that need Ray (see the header).
cat > "$PLUGIN_DIR/raydet_stress_select.py" <<'PY'
import inspect
import os
import re

# ray.init(...) in the test, or a `ray start --head` command line built as a list ([ray, "start", "--head", ...]);
# not the bare text "ray start --head", which tests of cluster files assert on.
_STARTS_RAY = re.compile(r"""ray\.init\(|["']start["'],\s*["']--head["']""")


def _needs_ray(item) -> bool:
    if "ray_session" in getattr(item, "fixturenames", ()):
        return True
    try:
        source = inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
        return False
    return bool(_STARTS_RAY.search(source))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("STRESS_ONLY_RAY", "1") == "0":
        return
    needs = {item.nodeid: _needs_ray(item) for item in items}
    keep = [item for item in items if needs[item.nodeid]]
    drop = [item for item in items if not needs[item.nodeid]]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
PY

HOGS=${STRESS_HOGS:-$(nproc)}
HOG_NICE=${STRESS_HOG_NICE:-${RAY_worker_niceness:-15}}
for _ in $(seq "$HOGS"); do
    nice -n "$HOG_NICE" bash -c 'while :; do :; done' &
    HOG_PIDS+=($!)
done

echo "stress: $ROUNDS round(s) of the Ray tests beside $HOGS busy process(es) at nice $HOG_NICE" \
     "(PIDs ${HOG_PIDS[*]}); python $PYTHON; logs in $LOG_DIR"
if [ -n "$OTHER_RAY" ]; then
    echo "stress: note: other Ray instances run on this host (gcs_server PIDs $OTHER_RAY); they load it too"
fi
if command -v ss >/dev/null && ss -ltnH 2>/dev/null | awk '{print $4}' | grep -qE '[:.]8265$'; then
    echo "stress: warning: something listens on port 8265 (another Ray dashboard?): Ray Train runs of these tests" \
         "may lose their workers to Ray's PlacementGroupCleaner (see this script's header)"
fi

PASSED=0
for round in $(seq "$ROUNDS"); do
    log="$LOG_DIR/round-$round.log"
    start=$(date +%s)
    cmd=("$PYTHON" -m pytest -q -p no:cacheprovider -p raydet_stress_select "${TARGETS[@]}" "$@")
    if [ -n "${STRESS_TIMEOUT:-}" ]; then
        cmd=(timeout --signal=INT --kill-after=120 "$STRESS_TIMEOUT" "${cmd[@]}")
    fi
    RAY_TMPDIR=$RAY_TMP PYTHONPATH="$PLUGIN_DIR${PYTHONPATH:+:$PYTHONPATH}" "${cmd[@]}" > "$log" 2>&1
    status=$?
    seconds=$(( $(date +%s) - start ))
    summary=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s' "$log" | tail -n 1 \
              | sed -E 's/^=+ //; s/ =+$//')
    if [ "$status" -eq 0 ]; then
        PASSED=$((PASSED + 1))
        echo "round $round/$ROUNDS: passed, $summary ($seconds s)"
    else
        case $status in
            5) why="no test selected" ;;
            124|137|2) why="interrupted${STRESS_TIMEOUT:+ (STRESS_TIMEOUT=$STRESS_TIMEOUT s)}" ;;
            *) why="exit status $status" ;;
        esac
        echo "round $round/$ROUNDS: failed ($why), ${summary:-no pytest summary} ($seconds s); log: $log"
        grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'
    fi
done

echo "stress: $PASSED/$ROUNDS rounds passed"
[ "$PASSED" -eq "$ROUNDS" ]
