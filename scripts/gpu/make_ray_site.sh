#!/usr/bin/env bash
# Builds .raysite/site.tar.xz (~40 MiB): Ray Serve 2.60 and what the GPU machine lacks to run the
# whole sglserve stack there (its Python is 3.12 and it has no package index). Versions follow
# this checkout's .venv, so the device runs what CI tests. Run from the repo root (~2 min).
# Then: one device call with carry [".raysite", ".cache/models"]:
#   bash scripts/gpu/run_ray_on_device.sh "bench.overhead --device cuda --name gpu_overhead"
set -euo pipefail
grep -qxF '/.raysite/' .git/info/exclude 2>/dev/null || echo '/.raysite/' >> .git/info/exclude
# The version in .venv, or nothing (then pip takes the newest) for what .venv does not have.
version() { .venv/bin/python -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"; }
# The device has torch, numpy, aiohttp, grpcio, protobuf, msgpack, prometheus_client, tokenizers,
# huggingface_hub, requests, pyyaml, uvloop, psutil, pytest (measured 2026-11-25); not these:
packages=(ray pydantic pydantic-core annotated-types typing-inspection fastapi starlette uvicorn
  jsonschema jsonschema-specifications referencing rpds-py mmh3 colorful aiohttp-cors smart_open
  opencensus opencensus-context opentelemetry-api opentelemetry-sdk opentelemetry-proto
  opentelemetry-exporter-prometheus opentelemetry-semantic-conventions google-api-core
  googleapis-common-protos proto-plus google-auth importlib-metadata cachetools pyasn1 pyasn1-modules
  rsa sniffio watchfiles wcwidth transformers xgrammar apache-tvm-ffi pytest-asyncio)
pins=()
for p in "${packages[@]}"; do v=$(version "$p"); pins+=("$p${v:+==$v}"); done
pins+=("grpcio-reflection==1.84.0")  # matches the device's grpcio
wheels=$(mktemp -d); site=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d "$wheels" "${pins[@]}"
for w in "$wheels"/*.whl; do python3 -c "import zipfile, sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$w" "$site"; done
# Ray parts sglserve never loads (libraries, Java, the dashboard's web build, tests).
rm -rf "$site"/ray/{rllib,tune,train,data,jars,workflow,llm,cpp} "$site"/ray/dashboard/client/build
find "$site" -name tests -type d -prune -exec rm -rf {} + ; find "$site" -name '*.map' -delete
mkdir -p .raysite
tar -C "$site" -cf - . | xz -T2 -6 > .raysite/site.tar.xz
rm -rf "$wheels" "$site"
ls -la .raysite
