#!/usr/bin/env bash
# Regenerate tests/fixtures/oft_images.npz: OpenVLA-OFT's own image functions (TensorFlow) on real LIBERO frames.
#
#   bash scripts/oft_golden.sh OFT_CHECKOUT        # a clone of https://github.com/moojink/openvla-oft (or a bare git dir)
#
# 1. renders the frames with rsd's .venv (real LIBERO, the headless renderer scripts/setup.sh picked);
# 2. builds a throwaway venv with tensorflow-cpu, pillow and numpy (never an rsd dependency) under
#    ${RSD_HOME:-~/.cache/rsd}/oft-golden-venv and runs OFT's functions there (scripts/oft_golden.py);
# 3. writes the fixture with its provenance (OFT commit, TensorFlow version). The unit tests in
#    tests/unit/test_oft_images.py then compare rsd.images against it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ $# -eq 1 ]] || { echo "usage: bash scripts/oft_golden.sh OFT_CHECKOUT (git clone https://github.com/moojink/openvla-oft)" >&2; exit 2; }
OFT="$(cd "$1" && pwd)"
[[ -x .venv/bin/python ]] || { echo "oft_golden.sh: run \`bash scripts/setup.sh\` first" >&2; exit 2; }
VENV="${RSD_HOME:-$HOME/.cache/rsd}/oft-golden-venv"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import tensorflow, PIL, numpy' 2>/dev/null; then
    echo "==> throwaway TensorFlow venv: $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q tensorflow-cpu pillow numpy </dev/null
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "==> rendering LIBERO frames"
.venv/bin/python scripts/oft_golden.py render --out "$TMP/frames.npz"
echo "==> OpenVLA-OFT's functions under TensorFlow"
mkdir -p tests/fixtures
TF_CPP_MIN_LOG_LEVEL=2 "$VENV/bin/python" scripts/oft_golden.py oft --frames "$TMP/frames.npz" --oft-repo "$OFT" \
    --out tests/fixtures/oft_images.npz
ls -l tests/fixtures/oft_images.npz
