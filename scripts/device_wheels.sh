#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, into .whl/ (ignored by git), for scripts/device_check.sh.
#
# The lent machines (H100/H200, the `device` tool) reach no package index. Their image holds torch,
# torchvision, lightning, torchmetrics, scikit-learn, pytest, joblib and rich (Python 3.12), not
# Hydra: this downloads Hydra and the launcher plugin at uv.lock's versions for Python 3.12 and builds
# kd's own wheel (its `kd-train` command is what the tests start). About 1 MiB; it travels with
# `carry=[".whl"]`.
#
# Usage, on this machine, in the repository root:  bash scripts/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
UV=.tools/bin/uv
[ -x "$UV" ] || make -s .tools/bin/uv  # .tools/: a venv with pip and uv

locked() {  # the version uv.lock pins for a package
    awk -v want="name = \"$1\"" '$0 == want {getline; gsub(/version = |"/, ""); print; exit}' uv.lock
}

rm -rf .whl && mkdir -p .whl
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
specs=()
for pkg in hydra-core omegaconf hydra-joblib-launcher; do specs+=("$pkg==$(locked "$pkg")"); done
.tools/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${specs[@]}"
# antlr4-python3-runtime (omegaconf's parser) is published as a source archive only: built here, pure Python
.tools/bin/python -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(locked antlr4-python3-runtime)"
"$UV" build -q --wheel -o .whl .
ls -1 .whl
