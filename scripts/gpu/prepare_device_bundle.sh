#!/usr/bin/env bash
# Lays out what scripts/gpu/bench_vs_launch_server.sh needs under <checkout>/.i14 (ignored by git
# through .git/info/exclude), where <checkout> is the checkout the device tool sends (the session's
# main checkout, not a helper's worktree). Run from the worktree being measured:
#   CHECKOUT=/work/main bash scripts/gpu/prepare_device_bundle.sh
# Builds the two bundles first if they are missing (~5-15 min on a busy 2-core machine):
#   .i14/sgl/sglang.tar.xz   (make_sglang_server_site.sh)      carry it in call 1
#   .i14/stack/stack.tar.xz  (make_stack_site.sh)              carry it in call 2
#   .i14/model, .i14/repo    (small; carry them in both calls)
set -euo pipefail
CHECKOUT="${CHECKOUT:-/work/main}"
D="$CHECKOUT/.i14"
git -C "$CHECKOUT" rev-parse --git-common-dir >/dev/null
exclude="$(git -C "$CHECKOUT" rev-parse --git-common-dir)/info/exclude"
grep -qxF '/.i14/' "$exclude" 2>/dev/null || echo '/.i14/' >> "$exclude"
mkdir -p "$D/sgl" "$D/stack"
[[ -s "$D/sgl/sglang.tar.xz" ]] || DEST="$D/sgl" bash scripts/gpu/make_sglang_server_site.sh
[[ -s "$D/stack/stack.tar.xz" ]] || DEST="$D/stack" bash scripts/gpu/make_stack_site.sh
[[ -f "$D/model/config.json" ]] || /work/main/.venv/bin/python bench/gpu/make_bench_model.py --out "$D/model"
# The code under test: this worktree's tracked and untracked-but-not-ignored files.
rm -rf "$D/repo"; mkdir -p "$D/repo"
git ls-files -co --exclude-standard | grep -v '^bench/results/' | tar -cf - -T - | tar -C "$D/repo" -xf -
du -sh "$D"/* ; du -sh "$D"
