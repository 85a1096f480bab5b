#!/usr/bin/env bash
# Run eval/bench_gpu.py on whatever machine this is: a CUDA device if torch sees one, else the CPU fallback.
# On CUDA it measures cost curves, the honest baseline (the sequential loop captured whole as one CUDA
# graph against `paradigms` with captured rounds, eager against graphs, fp32 against bf16, per schedule,
# with each round's own cost beside the model call's) and the per-schedule replay; see eval/bench_gpu.py.
#
#   bash eval/bench_gpu.sh --out "$OUT"                on a lent GPU machine (carry .whl), everything
#   bash eval/bench_gpu.sh [bench_gpu.py options]      e.g. --parts captured, --quick for a smoke run
#   bash eval/bench_gpu.sh --download-wheels           here (PyPI reachable): the wheels a bare GPU machine lacks
#
# A bare GPU machine is offline: nothing can be installed from a registry there. So this script
#  1. needs torch (it stops with a message if `import torch` fails);
#  2. installs wheels carried in .whl/ (made by --download-wheels: diffusers, which the core needs and
#     such images lack) into /tmp/para_policy_site, when a core package is missing;
#  3. installs this checkout without dependencies (`pip install --no-deps -e .`) if para_policy is not
#     importable, or else puts the checkout on PYTHONPATH;
#  4. runs `python eval/bench_gpu.py "$@"`.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
WHEELS=${PARA_POLICY_WHEELS:-.whl}
CORE="numpy diffusers safetensors"

if [[ "${1:-}" == "--download-wheels" ]]; then
    # diffusers is pure Python: one wheel serves any Python 3 (the GPU image has its other requirements)
    version=$("$PY" -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null || echo 0.42.1)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$WHEELS" "diffusers==$version"
    if [[ "$WHEELS" == .whl && -d .git ]] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
        echo '/.whl/' >> .git/info/exclude  # carried to the GPU machine, never committed
    fi
    ls -l "$WHEELS"
    echo "bench_gpu.sh: carry '$WHEELS' to the GPU machine with the run (carry: [\"$WHEELS\"])"
    exit 0
fi

if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "bench_gpu.sh: torch is not importable with $PY; this benchmark needs a Python with PyTorch" \
         "(set PYTHON=/path/to/python)" >&2
    exit 2
fi
missing() {  # the core packages $PY cannot import
    "$PY" - $CORE <<'PYEOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PYEOF
}
if [[ -n "$(missing)" ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "bench_gpu.sh: installing the carried wheels of $WHEELS into /tmp/para_policy_site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/para_policy_site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/para_policy_site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ -n "$(missing)" ]]; then
    echo "bench_gpu.sh: missing $(missing) (the core needs: $CORE). Offline, bring it as wheels: run" \
         "'bash eval/bench_gpu.sh --download-wheels' where PyPI is reachable and carry $WHEELS along." >&2
    exit 2
fi
# from / : the checkout's own folder must not make para_policy look installed (the script runs from eval/)
if ! (cd / && "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("para_policy") is None)'); then
    echo "bench_gpu.sh: installing this checkout (pip install --no-deps -e .)"
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . ; then
        echo "bench_gpu.sh: pip install failed; using the checkout from PYTHONPATH instead"
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
exec "$PY" eval/bench_gpu.py "$@"
