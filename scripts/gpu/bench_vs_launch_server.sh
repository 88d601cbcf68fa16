#!/usr/bin/env bash
# sglserve vs `python -m sglang.launch_server` on one GPU, measured by SGLang's own
# `sglang.benchmark.serving` (bench/gpu/bench_serving_sweep.py), plus the GPU test suite through the
# whole Serve application. Runs ON the GPU machine, from the device checkout's root:
#
#   bash scripts/gpu/bench_vs_launch_server.sh [steps...]     (default: all)
#
# steps: bare      launch_server on the model, the sweep, stop it (GPU memory back to idle)
#        sglserve  Ray head + `serve run deploy/serve_config.gpu.bench.yaml`, the same sweep,
#                  py-spy of the Ray processes under load, then (unless NO_TESTS=1) the GPU tests
#                  through HTTP (tests/gpu/test_serve_stack_gpu.py), then stop Ray
#        all       bare then sglserve
#        smollm2_model  join SmolLM2's GGUF halves (.i14/gguf_a, .i14/gguf_b) and dequantize it to a
#                  bf16 checkpoint in /tmp/i14/smollm2; then MODEL_KIND=smollm2 runs bare/sglserve on it
#        overhead  bench.overhead --device cuda (embedded engine in process vs the whole stack)
# What it needs lies in .i14/ of the checkout (prepared here by scripts/gpu/prepare_device_bundle.sh):
#   .i14/sgl/sglang.tar.xz   sglang 0.5.17 + launch_server/bench deps (make_sglang_server_site.sh)
#   .i14/stack/stack.tar.xz  Ray Serve 2.60 + pytest + py-spy (make_stack_site.sh)
#   .i14/model/              config.json (8B shape) + tokenizer (bench/gpu/make_bench_model.py)
#   .i14/repo/               optional: other code to measure (default: the checkout itself)
# Everything is unpacked under /tmp/i14, which outlives the call while the machine stays warm, so
# the two bundles may come in two calls made one right after the other (64 MiB per call).
# Results: $OUT/<step>.tar.gz (JSON lines, logs, py-spy profiles) and $OUT/<step>.log.
set -uo pipefail
G=/tmp/i14
CK="$PWD/.i14"
OUT="${OUT:-/tmp/i14_out}"
mkdir -p "$OUT" "$G"
t0=$(date +%s)
stamp() { echo "[bench_vs_launch_server +$(( $(date +%s) - t0 ))s] $*"; }
steps=("$@"); [[ ${#steps[@]} -eq 0 || "${steps[0]}" == all ]] && steps=(bare sglserve)
[[ "${steps[0]}" == unpack ]] && steps=()  # only unpack what this call carries (the next call uses it)

# ---------------------------------------------------------------- unpack what this call carries
unpack() {  # tarball dir marker
  [[ -f "$1" ]] || return 0
  rm -rf "$2"; mkdir -p "$2"
  python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='fully_trusted')" "$1" "$2" || exit 1
  stamp "unpacked $1 -> $2"
}
unpack "$CK/sgl/sglang.tar.xz" "$G/site"
unpack "$CK/stack/stack.tar.xz" "$G/stack"
# Or the sglang site as its (trimmed) wheels, split over calls: .i14/w1, .i14/w2, ... (what xz
# cannot compress in time on a busy CPU machine travels as wheels, which are zips already).
for d in "$CK"/w*/; do
  ls "$d"*.whl >/dev/null 2>&1 || continue
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$G/site" "$d"*.whl \
    2>&1 | grep -v -E "^WARNING: (Target directory|Running pip as)" ; stamp "installed $(ls "$d"*.whl | wc -l) wheels from $d"
done
if [[ -d "$G/stack/ray" ]]; then  # wheels are zips: the executable bits of Ray's binaries are lost
  find "$G/stack/ray/core" -type f ! -name '*.py' -exec chmod +x {} +; chmod +x "$G/stack/bin/"* 2>/dev/null
fi
if [[ -d "$CK/model" ]]; then rm -rf "$G/model"; cp -r "$CK/model" "$G/model"; fi
# SmolLM2-135M-Instruct's GGUF (98 MB) travels in two halves, .i14/gguf_a (with the gguf and accelerate
# wheels) and .i14/gguf_b (with its sha256), each beside another call's load; step smollm2_model joins them.
for d in "$CK"/gguf_*/; do
  [[ -d "$d" ]] || continue
  mkdir -p "$G/gguf"; cp "$d"* "$G/gguf/"; stamp "stashed $(ls "$d" | tr '\n' ' ')"
done
if [[ -d "$CK/repo" ]]; then rm -rf "$G/repo"; cp -r "$CK/repo" "$G/repo"
elif [[ -d "$PWD/app" && ${#steps[@]} -gt 0 ]]; then  # no .i14/repo carried: the checkout itself is the code
  rm -rf "$G/repo"; mkdir -p "$G/repo"; tar -C "$PWD" --exclude=./.i14 --exclude=./.git -cf - . | tar -C "$G/repo" -xf -
fi
# The model both servers serve: the 8B-shaped dummy-weights Llama by default; MODEL_KIND=smollm2
# serves SmolLM2-135M-Instruct's real weights (made on this machine by step smollm2_model).
if [[ "${MODEL_KIND:-dummy8b}" == smollm2 ]]; then
  MODEL="$G/smollm2" SERVED=smollm2 LOAD_FORMAT=auto
else
  MODEL="$G/model" SERVED=llama8b-shape LOAD_FORMAT=dummy
fi
if [[ ${#steps[@]} -gt 0 ]]; then
  needs=("$G/site/sglang" "$G/site/sgl_kernel" "$G/repo/app")
  [[ " ${steps[*]} " == *" smollm2_model "* ]] || needs+=("$MODEL/config.json")
  for need in "${needs[@]}"; do
    [[ -e "$need" ]] || { stamp "MISSING $need (was the machine given back between calls?)"; exit 3; }
  done
fi
export PYTHONPATH="$G/site:$G/stack:$G/repo/bench/gpu/shims:$G/repo" PATH="$G/stack/bin:$PATH"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TOKENIZERS_PARALLELISM=false
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 SGLANG_DISABLE_REQUEST_LOGGING=1
# The engine settings both servers get (the sglserve side reads them from the bench yaml).
SERVER_ARGS=(--model-path "$MODEL" --served-model-name "$SERVED" --load-format "$LOAD_FORMAT" --dtype bfloat16
  --context-length 8192 --mem-fraction-static 0.85 --max-running-requests 256 --chunked-prefill-size 8192
  --max-prefill-tokens 16384 --schedule-policy lpm --attention-backend triton --sampling-backend pytorch
  --grammar-backend xgrammar --enable-metrics --random-seed 0 --log-level warning)
SWEEP_ARGS=(--model "$MODEL" --served-name "$SERVED" ${SWEEP_EXTRA:-})

env_report() {
  { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
    python3 - <<'PY'
import importlib, platform
print("python", platform.python_version())
for n in ("torch", "triton", "sglang", "sgl_kernel", "flashinfer", "transformers", "tokenizers", "xgrammar",
          "fastapi", "uvicorn", "pydantic", "ray", "aiohttp", "pytest"):
    try:
        m = importlib.import_module(n); print(n, getattr(m, "__version__", "?"))
    except Exception as e:
        print(n, "NOT IMPORTABLE", type(e).__name__, str(e)[:160])
PY
  } > "$1" 2>&1
}

gpu_idle() {  # wait until the GPU holds < 2 GiB again (the last server's memory is released)
  for _ in $(seq 60); do
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    (( used < 2048 )) && return 0; sleep 1
  done
  stamp "GPU still holds ${used} MiB"; nvidia-smi; return 1
}

http() {  # METHOD url [json body]: prints the body, fails on a non-2xx answer (no curl needed)
  python3 - "$@" <<'PY'
import sys, urllib.request
method, url, body = sys.argv[1], sys.argv[2], (sys.argv[3].encode() if len(sys.argv) > 3 else None)
req = urllib.request.Request(url, data=body, method=method, headers={"content-type": "application/json"})
sys.stdout.write(urllib.request.urlopen(req, timeout=300).read().decode())
PY
}

wait_http() {  # url timeout_s pid
  local deadline=$(( $(date +%s) + $2 ))
  while (( $(date +%s) < deadline )); do
    http GET "$1" >/dev/null 2>&1 && return 0
    [[ -n "${3:-}" ]] && ! kill -0 "$3" 2>/dev/null && { stamp "server process $3 exited"; return 1; }
    sleep 2
  done
  return 1
}

pack() {  # step dir
  tar -C "$2" -czf "$OUT/$1.tar.gz" . 2>/dev/null; stamp "packed $OUT/$1.tar.gz"
}

# ---------------------------------------------------------------- bare SGLang server
step_bare() {
  local name="${BARE_NAME:-bare}"
  local W="$G/out/$name"; rm -rf "$W"; mkdir -p "$W"
  env_report "$W/env.txt"; cat "$W/env.txt"
  gpu_idle || return 1
  stamp "launch_server starting"
  echo "python3 -m sglang.launch_server ${SERVER_ARGS[*]} --host 127.0.0.1 --port 30000" > "$W/command.txt"
  setsid python3 -m sglang.launch_server "${SERVER_ARGS[@]}" --host 127.0.0.1 --port 30000 > "$W/server.log" 2>&1 &
  local pid=$!
  local started=$(date +%s)
  if ! wait_http http://127.0.0.1:30000/v1/models "${START_TIMEOUT_S:-420}" $pid; then
    stamp "launch_server not ready"; tail -40 "$W/server.log"; kill -KILL -- -$pid 2>/dev/null; pack "$name" "$W"; return 1
  fi
  # The first real generation pays SGLang's first-request kernel builds; sglserve pays the same in
  # its start-up warm-up, so both sides are measured warm.
  http POST http://127.0.0.1:30000/generate '{"text":"warm up","sampling_params":{"max_new_tokens":8}}' >/dev/null
  echo "ready_s $(( $(date +%s) - started ))" >> "$W/env.txt"
  stamp "launch_server ready after $(( $(date +%s) - started ))s; sweep"
  same_answers 30000 "$W"
  timeout "${SWEEP_TIMEOUT_S:-400}" python3 "$G/repo/bench/gpu/bench_serving_sweep.py" --side bare --port 30000 \
    --out "$W/results.jsonl" "${SWEEP_ARGS[@]}" > "$W/sweep.log" 2>&1
  stamp "sweep rc=$?"; grep -E "^\[sweep\]|Output token throughput|Median TTFT|Median ITL|hit rate" "$W/sweep.log" | tail -60
  http GET http://127.0.0.1:30000/metrics > "$W/metrics.txt" 2>/dev/null
  kill -TERM -- -$pid 2>/dev/null; for _ in $(seq 20); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  kill -KILL -- -$pid 2>/dev/null
  gpu_idle; pack "$name" "$W"
}

same_answers() {  # port dir: greedy chat answers to fixed prompts (real weights only), to compare sides
  [[ "$LOAD_FORMAT" == dummy ]] && return 0
  python3 "$G/repo/bench/gpu/same_answers.py" --port "$1" --model "$SERVED" --out "$2/answers.jsonl" \
    > "$2/answers.log" 2>&1; stamp "same answers rc=$?"; tail -3 "$2/answers.log"
}

# ---------------------------------------------------------------- SmolLM2-135M-Instruct, real weights
step_smollm2_model() {  # join the GGUF halves, dequantize to a bf16 checkpoint in $G/smollm2
  [[ -f "$G/smollm2/config.json" ]] && { stamp "SmolLM2 already at $G/smollm2"; return 0; }
  local f="$G/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
  cat "$G"/gguf/part_* > "$f" && (cd "$G/gguf" && sha256sum -c sha256.txt) || { stamp "GGUF halves missing or corrupt"; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$G/site" "$G"/gguf/*.whl 2>&1 | grep -v WARNING
  python3 -c "import sys; from pathlib import Path; from app.engines.gguf_model import dequantize_gguf
dequantize_gguf(Path(sys.argv[1]), Path(sys.argv[2]), 'bfloat16', progress=False)" "$f" "$G/smollm2.tmp" \
    && mv "$G/smollm2.tmp" "$G/smollm2" && stamp "SmolLM2 checkpoint: $(ls "$G/smollm2" | tr '\n' ' ')"
}

# ---------------------------------------------------------------- sglserve through Ray Serve
serve_pids() {  # pid of each Ray Serve actor of the app, by deployment (for py-spy)
  ps -eo pid,args | grep -E "ServeReplica:sglserve:(Ingress|Scheduler|ModelReplica)" | grep -v grep
}

# Variants of the sglserve side (each its own results folder, $OUT/<VARIANT>.tar.gz):
#   VARIANT=<name>       the folder's name (default sglserve)
#   RAY_MODE=throughput  Ray Serve's throughput mode (README's quick start): the Ingress serves HTTP
#                        itself on port 8100, handles talk gRPC; default: the HTTP proxy on 8000
#   OOM_TEST=1           after the GPU tests, tests/gpu/test_zz_oom_serve_stack.py (a CUDA
#                        out-of-memory in a step; the replica is replaced, ~2 more minutes)
step_sglserve() {
  local name="${VARIANT:-sglserve}" port=8000
  local W="$G/out/$name"; rm -rf "$W"; mkdir -p "$W"
  export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=app.proxy_errors.proxy_middlewares
  if [[ "${RAY_MODE:-proxy}" == throughput ]]; then
    export RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=8100 \
      RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=8101
    port=8100
  fi
  [[ -d "$G/stack/ray" ]] || { stamp "no Ray stack in $G/stack"; return 1; }
  env_report "$W/env.txt"; cat "$W/env.txt"
  gpu_idle || return 1
  # The bench yaml with this run's model and SERVE_SET's settings ("scheduler.adaptive_concurrency=false
  # ...": dotted keys under the application's args, YAML values).
  local cfg="$W/serve_config.yaml"
  python3 - "$G/repo/deploy/serve_config.gpu.bench.yaml" "$cfg" "$MODEL" "$SERVED" "$LOAD_FORMAT" ${SERVE_SET:-} <<'PY' || return 1
import sys, yaml
src, dst, model, served, load_format, *sets = sys.argv[1:]
config = yaml.safe_load(open(src))
args = config["applications"][0]["args"]
args["model"].update(model_path=model, served_model_name=served)
args["engine"]["load_format"] = load_format
for item in sets:
    key, value = item.split("=", 1)
    *path, leaf = key.split(".")
    node = args
    for part in path:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(value)
yaml.safe_dump(config, open(dst, "w"), sort_keys=False)
print("serve config:", dst, "with", sets or "no changes")
PY
  echo "${RAY_MODE:+RAY_MODE=$RAY_MODE }${SERVE_SET:+SERVE_SET='$SERVE_SET' }ray start --head --num-gpus 1; serve run $cfg" > "$W/command.txt"
  stamp "ray start"
  RAY_metrics_report_interval_ms=2000 python3 -m ray.scripts.scripts start --head --num-gpus 1 \
    --include-dashboard false --disable-usage-stats --metrics-export-port 8080 \
    > "$W/ray_start.log" 2>&1 || { cat "$W/ray_start.log"; pack "$name" "$W"; return 1; }
  stamp "serve run"
  local started=$(date +%s)
  RAY_ADDRESS=auto setsid python3 -c "import sys; from ray.serve.scripts import cli; sys.exit(cli())" \
    run "$cfg" > "$W/serve_run.log" 2>&1 &
  local pid=$!
  if ! wait_http "http://127.0.0.1:$port/ready" "${START_TIMEOUT_S:-420}" $pid; then
    stamp "sglserve not ready"; tail -60 "$W/serve_run.log"; collect_ray_logs "$W"
    kill -INT $pid 2>/dev/null; sleep 5; python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
    pack "$name" "$W"; return 1
  fi
  echo "ready_s $(( $(date +%s) - started ))" >> "$W/env.txt"
  stamp "sglserve ready after $(( $(date +%s) - started ))s; sweep"
  serve_pids > "$W/serve_pids.txt"; cat "$W/serve_pids.txt"
  same_answers "$port" "$W"
  profile_under_load "$W" &
  local prof=$!
  timeout "${SWEEP_TIMEOUT_S:-400}" python3 "$G/repo/bench/gpu/bench_serving_sweep.py" --side "$name" --port "$port" \
    --out "$W/results.jsonl" "${SWEEP_ARGS[@]}" > "$W/sweep.log" 2>&1
  stamp "sweep rc=$?"; grep -E "^\[sweep\]|Output token throughput|Median TTFT|Median ITL|hit rate" "$W/sweep.log" | tail -60
  kill $prof 2>/dev/null
  http GET http://127.0.0.1:8080/metrics > "$W/metrics.txt" 2>/dev/null
  http GET "http://127.0.0.1:$port/server_info" > "$W/server_info.json" 2>/dev/null
  if [[ "${NO_TESTS:-0}" != 1 ]]; then
    stamp "GPU tests through the Serve application"
    local modules=(tests/gpu/test_serve_stack_gpu.py)
    [[ "${OOM_TEST:-0}" == 1 ]] && modules+=(tests/gpu/test_zz_oom_serve_stack.py)
    ( cd "$G/repo" && SGLSERVE_GPU_BASE_URL="http://127.0.0.1:$port" SGLSERVE_GPU_MODEL="$SERVED" \
      timeout "${TESTS_TIMEOUT_S:-420}" python3 -m pytest "${modules[@]}" -v -p no:cacheprovider \
      -rs --junitxml "$W/tests.xml" > "$W/tests.log" 2>&1 )
    stamp "tests rc=$?"; grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|OOM" "$W/tests.log" | tail -40
  fi
  collect_ray_logs "$W"
  kill -INT $pid 2>/dev/null; for _ in $(seq 15); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1  # the GPU machine is ours alone
  gpu_idle; pack "$name" "$W"
}

# ---------------------------------------------------------------- framework overhead (issue 16)
step_overhead() {  # bench.overhead with the embedded engine on this GPU: in-process vs the whole stack
  local W="$G/out/overhead"; rm -rf "$W"; mkdir -p "$W"
  gpu_idle || return 1
  ( cd "$G/repo" && timeout "${OVERHEAD_TIMEOUT_S:-420}" python3 -m bench.overhead --device cuda \
      --name gpu_overhead_tickets ${OVERHEAD_ARGS:-} > "$W/overhead.log" 2>&1 )
  stamp "overhead rc=$?"; tail -30 "$W/overhead.log"
  cp "$G"/repo/bench/results/gpu_overhead_tickets.* "$W/" 2>/dev/null
  python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1
  pack overhead "$W"
}

profile_under_load() {  # py-spy the three Serve actors while the c=128 steps run
  local W=$1
  command -v py-spy >/dev/null || { echo "no py-spy" > "$W/pyspy.txt"; return; }
  for _ in $(seq 400); do grep -q "c128" "$W/sweep.log" 2>/dev/null && break; sleep 1; done
  sleep 8
  while read -r p rest; do
    name=$(echo "$rest" | grep -oE "(Ingress|Scheduler|ModelReplica)")
    py-spy record -d 12 -r 200 -f speedscope -o "$W/pyspy_${name}.json" -p "$p" --nonblocking > "$W/pyspy_${name}.log" 2>&1 &
  done < "$W/serve_pids.txt"
  wait
}

collect_ray_logs() {
  mkdir -p "$1/ray_logs"
  cp /tmp/ray/session_latest/logs/serve/*.log "$1/ray_logs/" 2>/dev/null
  for f in /tmp/ray/session_latest/logs/worker-*.err; do
    grep -qE "Traceback|Error" "$f" 2>/dev/null && tail -200 "$f" > "$1/ray_logs/$(basename "$f")"
  done
  grep -lE "Traceback" "$1"/ray_logs/* 2>/dev/null | head -3 | while read -r f; do
    echo "--- $f"; grep -E "Error|error" "$f" | tail -5 | cut -c1-600; done
}

rc=0
if [[ ${#steps[@]} -eq 0 ]]; then
  du -sh "$G"/* 2>/dev/null; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
fi
for s in "${steps[@]}"; do
  stamp "step $s"
  "step_$s" > >(tee "$OUT/$s.log") 2>&1 || rc=1
done
stamp "done rc=$rc"
exit $rc
