#!/usr/bin/env bash
# The one device call: GPU test suite + GPU benchmark against the real sglang.Engine.
#
# Prepare here (CPU machine, repo root), once:
#   bash scripts/gpu/make_sglang_site.sh          # -> .sgl/site.tar.xz (sglang 0.5.17 + deps, ~44 MiB, ~3 min)
#   bash scripts/gpu/fetch_test_wheels.sh         # -> .whl/ (pytest 9.2 + pytest-asyncio 1.5)
# Then one call of the device tool, from the repo root, with carry [".sgl", ".whl"]:
#   bash scripts/gpu/run_on_device.sh [tests|bench|all]
# Logs and results land in $OUT: env.txt, gpu_tests.log, gpu_tests.xml, bench.log,
# bench_results.json, results.md.
set -uo pipefail
what="${1:-all}"
OUT="${OUT:-/tmp/sglserve_gpu_out}"
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[run_on_device +$(( $(date +%s) - t0 ))s] $*"; }

stamp "unpacking sglang site"
python3 -c "import tarfile; tarfile.open('.sgl/site.tar.xz').extractall('/tmp/site', filter='fully_trusted')" || exit 1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TOKENIZERS_PARALLELISM=false SGLSERVE_TEST_CACHE=/tmp/sglserve_models

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nvcc --version 2>/dev/null | tail -1
  python3 - <<'PY'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "sglang", "sgl_kernel", "transformers", "tokenizers", "xgrammar",
             "pydantic", "pytest", "pytest_asyncio", "psutil", "tqdm", "ray"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as e:
        print(name, "NOT IMPORTABLE:", type(e).__name__, str(e)[:200])
import torch
print("cuda", torch.version.cuda, "devices", torch.cuda.device_count(), torch.cuda.get_device_name(0))
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if python3 -c "import xgrammar" 2>/dev/null; then
  export SGLSERVE_GPU_GRAMMAR_BACKEND=xgrammar
else
  export SGLSERVE_GPU_GRAMMAR_BACKEND=none
fi
stamp "grammar backend: $SGLSERVE_GPU_GRAMMAR_BACKEND"

rc_tests=0
rc_bench=0
if [[ "$what" == "tests" || "$what" == "all" ]]; then
  stamp "building the tiny model"
  python3 -m app.engines.tiny_model --cache-dir "$SGLSERVE_TEST_CACHE" --quiet
  stamp "GPU test suite"
  # Own process group, so whatever SGLang leaves behind on a timeout can be ended by its id
  # before the benchmark needs the GPU. -s: SGLang's own output goes to the log as it happens.
  setsid python3 -m pytest tests/gpu -v -s -p no:cacheprovider -rs --timeout "${TEST_TIMEOUT_S:-200}" \
    --junitxml "$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1 &
  pid=$!
  ( sleep "${TESTS_TIMEOUT_S:-300}"; kill -TERM -- "-$pid" 2>/dev/null; sleep 10; kill -KILL -- "-$pid" 2>/dev/null ) &
  killer=$!
  wait "$pid"; rc_tests=$?
  kill "$killer" 2>/dev/null
  kill -KILL -- "-$pid" 2>/dev/null  # anything of the test session still alive
  grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/gpu_tests.log" | grep -v "^\s*$" | tail -60
  stamp "tests rc=$rc_tests"
fi
if [[ "$what" == "bench" || "$what" == "all" ]]; then
  stamp "benchmark"
  timeout "${BENCH_TIMEOUT_S:-330}" python3 bench/gpu/bench_overhead.py --out "$OUT" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  rc_bench=${PIPESTATUS[0]}
  stamp "bench rc=$rc_bench"
fi
stamp "done: tests rc=$rc_tests bench rc=$rc_bench"
exit $(( rc_tests != 0 || rc_bench != 0 ))
