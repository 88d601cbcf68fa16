#!/usr/bin/env bash
# Builds $DEST/sglang.tar.xz: sglang 0.5.17 (the newest release pinned to the GPU machine's torch
# 2.11) and the other packages its Engine needs for a Llama model on the triton attention backend
# (make_sglang_site.sh's set), PLUS what `python -m sglang.launch_server` and
# `python -m sglang.benchmark.serving` import at module level that the device lacks
# (python-multipart, zstandard; found by importing both against this site), as cp312 wheels with
# binaries that path never loads removed, installed into one tree and packed (~44 MiB).
# soundfile (imported by the server's realtime-audio module) travels as an import shim instead
# (bench/gpu/shims). Run from the project root on the CPU machine:
#   DEST=<dir> bash scripts/gpu/make_sglang_server_site.sh
# WHEELS_ONLY=1 stops after trimming and leaves the wheels in $DEST/wheels (no xz: on a busy
# 2-core machine xz -9e of the ~300 MB tree took over 40 minutes; the wheels are zips already).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(pwd)"
DEST="$(cd "$root" && mkdir -p "${DEST:-.gpu}" && cd "${DEST:-.gpu}" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
P="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --platform linux_x86_64 --platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64 $(for i in $(seq 5 39); do printf -- '--platform manylinux_2_%s_x86_64 ' $i; done)"
cd "$work"
python3 -m pip download -q --no-deps $P -d w \
  sglang==0.5.17 sglang-kernel==0.4.5 flashinfer-python==0.6.15.post1 xgrammar==0.2.1 \
  apache-tvm-ffi==0.1.11 transformers==5.12.1 tokenizers==0.22.2 torch-c-dlpack-ext==0.1.5 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 pyzmq==27.3.0 orjson==3.13.0 pybase64==1.5.1 msgspec==0.22.0 setproctitle==1.3.8 \
  partial-json-parser==0.2.1.1.post7 dill==0.4.1 starlette==1.10.0 fastapi==0.165.0 uvicorn==0.54.0 opentelemetry-api==1.45.2 \
  openai==2.6.1 jiter==0.19.0 sniffio==1.3.1 distro==1.9.0 compressed-tensors==0.20.0 loguru==0.7.3 gguf==0.19.0 ipython==9.18.1 traitlets==5.16.1 \
  python-multipart==0.0.34 zstandard==0.25.0
mkdir -p wt
python3 "$here/trim_wheels.py"
if [[ "${WHEELS_ONLY:-0}" == 1 ]]; then mkdir -p "$DEST/wheels"; cp wt/*.whl "$DEST/wheels/"; ls -la "$DEST/wheels"; exit 0; fi
python3 -m pip install -q --no-index --no-deps --no-compile --target site $P wt/*.whl
tar -C site -cf - . | xz -9e -T0 > "$DEST/sglang.tar.xz"
ls -la "$DEST/sglang.tar.xz"
