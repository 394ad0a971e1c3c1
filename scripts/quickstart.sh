#!/usr/bin/env bash
# The main job, from a fresh machine: install everything (idempotent; fast the second time), then evaluate the
# embedded default policy on LIBERO with the OpenVLA-OFT protocol.
#
# The embedded default policy is `lowdim` (rsd/assets/policies/lowdim_rsd): a learned RSD policy trained here with
# `rsd train-policy` on expert demonstrations, which reads the objects' poses, the proprio vector and the instruction
# and emits RFSQ tokens that the packaged tokenizer decodes into 8x7 action chunks (greedy decoding; it needs no
# rendering). `--policy lowdim-l1` is its L1-regression sibling; `expert` and `expert-rfsq` are the scripted oracles.
#
# Arguments are passed to `rsd eval` and override the defaults below, e.g.
#   bash scripts/quickstart.sh --trials 50 --workers 2
#   bash scripts/quickstart.sh --render --video all --tasks 0 --trials 2      # mp4s under runs/quickstart/videos
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One results directory per commit: a rerun on the same code resumes it; new code (whose policy hash differs, which
# --resume refuses) starts its own.
OUT="runs/quickstart/$(git rev-parse --short HEAD 2>/dev/null || echo local)"
exec .venv/bin/rsd eval --suite libero_spatial --policy lowdim --trials 3 --no-render --video none \
    --out "$OUT" --resume "$@"
