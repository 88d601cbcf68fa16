#!/usr/bin/env bash
# On the GPU machine (one device call, carry [".raysite", ".cache/models"]): unpack Ray Serve
# (scripts/gpu/make_ray_site.sh) and run each argument as `python3 -m <argument>`, e.g. a
# benchmark with --device cuda or `pytest tests/engine`. Results named bench/results/gpu_* go to $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/sglserve_gpu_out}"
mkdir -p "$OUT"
python3 -c "import tarfile; tarfile.open('.raysite/site.tar.xz').extractall('/tmp/site', filter='fully_trusted')" || exit 1
# Wheels are zip files: the executable bits of Ray's binaries (gcs_server, raylet) are lost.
find /tmp/site/ray/core -type f ! -name '*.py' -exec chmod +x {} +
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
rc=0
for step in "$@"; do
  echo "=== python3 -m $step"
  # shellcheck disable=SC2086  # each argument is a module and its options
  timeout "${STEP_TIMEOUT_S:-540}" python3 -m $step 2>&1 | grep -vE "INFO|it/s\]" | tail -60
  rc=$(( rc || PIPESTATUS[0] ))
done
cp bench/results/gpu_* "$OUT"/ 2>/dev/null
for log in $(grep -l -E "Traceback" /tmp/ray/session_latest/logs/serve/*.log 2>/dev/null | head -3); do
  echo "--- $log"; grep -E "Error" "$log" | tail -4 | cut -c1-1500
done
exit $rc
