#!/usr/bin/env bash
# The checks that need a GPU, as one prepared script for a lent machine (the `device` tool: an
# H100/H200 for about 15 minutes a session, no package index, its own torch).
#
# Parts (any of them, in the order given; default: bench tests):
#   tests     the gpu-marked tests
#   branches  the concurrent launcher's and speed tests, whose GPU branches run only on a GPU
#   bench     scripts/benchmark.py --device cuda: the speed table, syncs per step, runs at once, the sweep
#   cost      scripts/table_cost.py --device cuda: the GPU-hours of the CRD tables (docs/reproduce.md)
# Each part's output goes to $OUT/<part>.log ($OUT: the folder the device tool brings back; else
# outputs/device/), each under its own time limit, so one part that hangs leaves the others' logs.
#
# Usage: first, here, once per change of the code: `bash scripts/device_wheels.sh` (the wheels
# the machine lacks, .whl/); then through the device tool, two calls within its 10-minute limit:
#   run(command="bash scripts/device_check.sh bench tests", carry=[".whl"], timeout_s=590)
#   run(command="bash scripts/device_check.sh cost branches", carry=[".whl"], timeout_s=590)
# PYTHON names the interpreter that holds torch (default python3, the image's).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/device}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
ENV=/tmp/kd-env
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 KD_VERBOSE=0

# A venv of its own over the image's packages (the image's own may be read-only): Hydra and kd's
# wheel (its `kd-train` command, which the tests start beside the interpreter) from .whl/.
if [ ! -x "$ENV/bin/kd-train" ]; then
    ls .whl/kd-*.whl >/dev/null 2>&1 || { echo "no .whl/: run bash scripts/device_wheels.sh here and carry .whl"; exit 2; }
    "$PYTHON" -m venv --without-pip "$ENV" || exit 2
    image=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    mine=$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "import site; site.addsitedir('$image')" > "$mine/zz_image.pth"  # its .pth files too
    "$PYTHON" -m pip --python "$ENV/bin/python" install -q --no-index --no-deps --no-compile .whl/*.whl || exit 2
fi
PY=$ENV/bin/python
"$PY" - <<'EOF' | tee "$OUT/machine.log"
import platform, torch, lightning, hydra
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"{name}; torch {torch.__version__}, lightning {lightning.__version__}, hydra {hydra.__version__}, "
      f"Python {platform.python_version()}, {torch.get_num_threads()} CPU threads")
EOF

part() {  # part NAME SECONDS COMMAND...: the command under a time limit, its output in $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name (at most ${limit}s): $*" | tee "$OUT/$name.log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$OUT/$name.log"
}

for name in "${@:-bench tests}"; do
    for p in $name; do
        case $p in
            tests)
                part tests 230 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_configs.py tests/test_host_sync.py tests/data/test_fast.py tests/test_slurm.py tests/losses/test_mlkd_views.py ;;
            branches) part tests_gpu_branches 200 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_concurrent.py tests/test_speed.py ;;
            bench) part bench 300 "$PY" scripts/benchmark.py --device cuda --warmup 10 --steps 100 ;;
            cost) part cost 300 "$PY" scripts/table_cost.py --device cuda ;;
            *) echo "unknown part $p (tests, branches, bench, cost)"; exit 2 ;;
        esac
    done
done
