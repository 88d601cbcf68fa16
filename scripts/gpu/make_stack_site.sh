#!/usr/bin/env bash
# Builds $DEST/stack.tar.xz: what the GPU machine needs on top of sglang's site (make_sglang_site.sh
# with the launch_server extras, see make_sglang_server_site.sh) to run the whole sglserve stack and the
# GPU tests: Ray Serve 2.60 and its dependencies, pytest 9.2 + pytest-asyncio, py-spy. Packages
# the sglang site already carries (pydantic, fastapi, starlette, uvicorn, transformers, openai, ...)
# or the device already has (KINDS.md: aiohttp, grpcio, protobuf, msgpack, prometheus_client,
# requests, pyyaml, psutil, ...) are left out, so that both bundles fit one device call or two.
# Usage (repo root, CPU machine): DEST=<dir> bash scripts/gpu/make_stack_site.sh   (~2 min)
set -euo pipefail
DEST="${DEST:-.gpu}"
VENV="${VENV:-/work/main/.venv}"
version() { "$VENV/bin/python" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"; }
packages=(ray jsonschema jsonschema-specifications referencing rpds-py mmh3 colorful aiohttp-cors smart_open
  opencensus opencensus-context opentelemetry-sdk opentelemetry-proto opentelemetry-exporter-prometheus
  opentelemetry-semantic-conventions google-api-core googleapis-common-protos proto-plus google-auth
  cachetools pyasn1 pyasn1-modules rsa watchfiles wcwidth pytest pytest-asyncio pluggy iniconfig py-spy)
pins=()
for p in "${packages[@]}"; do v=$(version "$p"); pins+=("$p${v:+==$v}"); done
pins+=("grpcio-reflection==1.84.0")  # matches the device's grpcio
wheels=$(mktemp -d); site=$(mktemp -d)
trap 'rm -rf "$wheels" "$site"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any -d "$wheels" "${pins[@]}"
for w in "$wheels"/*.whl; do python3 -c "import zipfile, sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$w" "$site"; done
# py-spy's wheel puts its binary under *.data/scripts.
mkdir -p "$site/bin"; find "$site" -path '*.data/scripts/py-spy' -exec mv {} "$site/bin/py-spy" \; || true
# Ray parts sglserve never loads (libraries, Java, the dashboard's web build, tests).
rm -rf "$site"/ray/{rllib,tune,train,data,jars,workflow,llm,cpp,air/examples} "$site"/ray/dashboard/client/build
find "$site" -name tests -type d -prune -exec rm -rf {} + ; find "$site" -name '*.map' -delete
mkdir -p "$DEST"
tar -C "$site" -cf - . | xz -T2 -7 > "$DEST/stack.tar.xz"
ls -la "$DEST/stack.tar.xz"
