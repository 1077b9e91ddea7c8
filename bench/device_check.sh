#!/usr/bin/env bash
# The GPU check as one prepared script (under 8 minutes on one GPU): the CUDA tests, then the GPU benches
# (python -m kvembed.bench.device_check: random weights shaped like SmolLM2-135M, Qwen3-4B and Mistral-7B, bf16,
# T up to 8192, B up to 32, against transformers' sdpa forward on the same tensors).
#
#     here, once:        bench/fetch_device_wheels.sh                    (.whl/, ignored by git)
#     on the GPU machine: bash bench/device_check.sh [RESULTS_DIR]      (with .whl/ copied along; give it ~9 min)
#     back here:         copy RESULTS_DIR/device_check.json into bench/results/ && python -m kvembed.bench.report
#
# Wheels in .whl/ are installed (into /tmp/site, first on PYTHONPATH) only for distributions the machine's python
# lacks; KVEMBED_WHEELS=all installs every one. Results go to RESULTS_DIR (default bench/results):
# device_check.json, perf.md, device_check.log, device_pytest.log. BUDGET_S (default 270): no new bench case
# starts after that many seconds; the JSON is rewritten after every model.
set -uo pipefail
cd "$(dirname "$0")/.."
RES="${1:-bench/results}"
mkdir -p "$RES"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
log() { echo "[device_check +$(( $(date +%s) - start ))s] $*"; }

# 1. Packages the machine lacks, from the carried wheels.
if compgen -G ".whl/*.whl" > /dev/null; then
  missing=$("$PY" - <<'PYEOF'
import glob, os, re
from importlib import metadata
every = os.environ.get("KVEMBED_WHEELS") == "all"
for wheel in sorted(glob.glob(".whl/*.whl")):
    dist = re.sub(r"[-_.]+", "-", os.path.basename(wheel).split("-")[0]).lower()
    try:
        metadata.version(dist)
        if every:
            print(wheel)
    except metadata.PackageNotFoundError:
        print(wheel)
PYEOF
)
  if [ -n "$missing" ]; then
    log "installing from .whl: $(for w in $missing; do basename "$w"; done | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $missing \
      || log "pip install failed: continuing with what is there"
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    log "every carried wheel's distribution is installed already"
  fi
fi
nvidia-smi -L 2>/dev/null
"$PY" -c "import torch, importlib.metadata as m
print('torch', torch.__version__, 'cuda', torch.version.cuda,
      'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())
for d in ('transformers', 'tokenizers', 'safetensors', 'huggingface-hub', 'numpy', 'pytest'):
    try: print(d, m.version(d))
    except m.PackageNotFoundError: print(d, 'MISSING')"

# 2. The CUDA tests: every test with 'cuda' in its name, in every test file that mentions CUDA.
tests=$(grep -li "cuda" tests/test_*.py | tr '\n' ' ')
log "pytest -k cuda $tests"
timeout 90 "$PY" -m pytest -q -p no:cacheprovider -rs -k cuda $tests 2>&1 | tee "$RES/device_pytest.log"
pytest_rc=${PIPESTATUS[0]}
log "pytest exit $pytest_rc"

# 3. The GPU benches (profiler chatter filtered out of the log).
timeout 330 "$PY" -m kvembed.bench.device_check --out "$RES" --budget-s "${BUDGET_S:-270}" 2>&1 \
  | grep -v '^USDT:' | tee "$RES/device_check.log"
bench_rc=${PIPESTATUS[0]}
log "device_check exit $bench_rc; results in $RES"
[ "$pytest_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
