#!/usr/bin/env bash
# Downloads the test-runner wheels the GPU machine lacks (it has no package index) into .whl/
# (ignored by git; carried by the device call). Run from the repo root.
set -euo pipefail
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform any -d .whl \
  pytest==9.2.0 pytest-asyncio==1.5.0 pluggy==1.7.0 iniconfig==2.3.1
ls -la .whl
