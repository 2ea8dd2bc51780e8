#!/usr/bin/env bash
# The GPU check of issue 16 (item 3), in one prepared script, in under 8 minutes:
#
#   PYTHONPATH=. bash bench/gpu.sh           # on a CUDA machine, with python3 (torch + CUDA)
#   (first, on a machine with PyPI: bash bench/gpu-wheels.sh, then carry .whl/ along)
#   bash bench/gpu.sh --cpu                  # CPU only, tiny workload (CI; well under 2 min)
#   PYTHON=.venv/bin/python bash bench/gpu.sh --cpu
#
#   0. preflight: which interpreter, torch, CUDA, and which Python modules are missing, by name
#      and purpose (bench/speed/gpu.py preflight). No torch, or --cuda without a GPU: stop here.
#   a. the engine tests on the device: COREMERGE_TEST_DEVICE=cuda (or cpu) python -m pytest -q
#      tests/engine. Without pytest or pydantic (the engine tests' conftest imports jobs.spec),
#      tests/engine/test_device.py runs through its own plain runner instead (the device
#      cases only), and the script says so; without hypothesis, test_properties.py is left out.
#   b. the speed table: bench/speed/gpu.py run (Llama-3-8B shapes, 8 adapters of rank 16,
#      8 layers; core ta/ties/tsv through `python -m worker.cli merge --device cuda` and on the
#      CPU, the I/O floor, the engine alone unbatched and batched). JSON in bench/out/ and
#      bench/results/gpu-latest.json (--cpu: bench/out/ only). Skipped, failing the script,
#      when the preflight found a module it needs missing (pydantic, say).
#
# Exit status: 0 when every part passed; 1 when a part failed or timed out; 2 or 3 when the
# preflight found something missing (see its lines). Each part runs under its own timeout.
set -uo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

mode=cuda
for arg in "$@"; do
    case "$arg" in
        --cpu) mode=cpu ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$arg' (try --help)" >&2; exit 64 ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || { echo "gpu.sh: no interpreter '$PY' (set PYTHON=...)" >&2; exit 3; }
# Wheels carried from a machine with PyPI (bench/gpu-wheels.sh): installed privately first.
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/coremerge-site .whl/*.whl || { echo "gpu.sh: .whl/ would not install" >&2; exit 3; }
    PYTHONPATH="/tmp/coremerge-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
if [[ $mode == cpu ]]; then
    tests_timeout=150 bench_timeout=150 bench_args=(--device cpu --budget 90)
else
    tests_timeout=180 bench_timeout=270 bench_args=(--device cuda --budget 200)
fi
started=$SECONDS
status=0

note() { echo "gpu.sh: $*"; }
timed_out() { [[ $1 == 124 || $1 == 137 ]]; }
# part_ended RC LIMIT SUBJECT NAME: how a part ended; a failure (or a timeout) fails the script.
part_ended() {
    (($1 == 0)) && return 0
    timed_out "$1" && note "$3 ran past $2 s"
    note "$4 FAILED (exit $1)"
    status=1
}

echo "== 0. preflight ($mode, $PY)"
"$PY" -m bench.speed.gpu preflight --device "$mode"
pre=$?
if ((pre == 3)); then
    note "stopping: nothing can run on '$mode' here (see above)"
    exit 3
fi
((pre == 0)) || status=$pre

echo "== a. engine tests on $mode"
if "$PY" -c "import pytest, pydantic" 2>/dev/null; then
    ignore=()
    if ! "$PY" -c "import hypothesis" 2>/dev/null; then
        ignore=(--ignore=tests/engine/test_properties.py)
        note "hypothesis missing: tests/engine/test_properties.py left out"
    fi
    note "pytest: COREMERGE_TEST_DEVICE=$mode $PY -m pytest -q tests/engine"
    COREMERGE_TEST_DEVICE=$mode timeout "$tests_timeout" \
        "$PY" -m pytest -q -p no:cacheprovider "${ignore[@]}" tests/engine
    rc=$?
else
    note "pytest or pydantic missing: running tests/engine/test_device.py's plain runner" \
        "(python -m tests.engine.test_device: the device cases only, not the whole suite)"
    COREMERGE_TEST_DEVICE=$mode timeout "$tests_timeout" "$PY" -m tests.engine.test_device
    rc=$?
fi
part_ended $rc "$tests_timeout" "the tests" "engine tests"

echo "== b. speed on $mode"
if ((pre != 0)); then
    note "speed run skipped: the preflight found a module it needs missing (above)"
else
    timeout "$bench_timeout" "$PY" -m bench.speed.gpu run --python "$PY" "${bench_args[@]}"
    part_ended $? "$bench_timeout" "the speed run" "speed run"
fi

note "done in $((SECONDS - started)) s, exit status $status"
exit $status
