"""CUDA latency breakdown of the RSD pipeline over an OpenVLA-shaped backbone, with floors.

``run_breakdown(backbone="openvla-shaped", device="cuda", iters=50, num_images=2) -> dict`` (what ``rsd
bench --device cuda`` calls) measures, at batch 1, for the eager path and the fast path (CUDA graphs,
``rsd.fastpath``), with ``num_images`` 2 (OFT on LIBERO: full + wrist image, 545 tokens with the LIBERO
prompt) or 1 (full image only, OFT's 1-image configuration: 289 tokens):

- ``vision``     both towers on both images + projector + proprio token (GPU time, CUDA events)
- ``llm``        the 7B decoder over the whole sequence -> last hidden state (GPU time)
- ``backbone``   the two above as one call, ``OpenVLAModel.rsd_hidden`` (GPU time)
- ``encode``     ``Backbone.encode``: host preprocessing + the above + checks (wall clock)
- ``rsd_decode`` heads + argmax + layout + RFSQ decode: greedy, and speculative in its worst case
                 (the draft is rejected at layer 0) and best case (all k draft layers accepted)
- ``predict_chunk`` ``RSDPolicy.predict_chunk`` end to end (wall clock) with ``_greedy`` eager heads,
                 ``_graphed`` ``RSDPolicy(graphed=True)`` (one CUDA graph for heads..decode),
                 ``_graphed_compiled`` the same with ``compile_heads=True`` (compiled variants only), ``_spec``
                 speculative with the random draft (``exact``: rejected at layer 0, the worst case) and
                 ``_spec_full_accept`` speculative ``exact`` with a draft built to propose the main head's
                 greedy codes (:func:`full_accept_draft`: all k layers accepted, the best case)
- ``pipeline_graphed_decode`` fast encode + :class:`rsd.fastpath.GraphedRSDDecoder` + the policy's
                 post-processing (what ``predict_chunk`` costs once the policy uses the graphed decode)

Variants: ``eager`` (the plain module), ``graph`` (the same module in CUDA graphs), ``optimized_eager``
(``OpenVLAModel.optimize_for_inference``, no graphs), ``fast`` (both: what ``set_fast(True)`` runs) and
``fast_compiled`` (``set_fast(True, compile=True)``: also torch.compile'd layers and decode rollout) and, with
``autotune=True``, ``fast_autotune`` (the layers compiled with ``max-autotune-no-cudagraphs``; its decode graphs
keep inductor's default mode). :func:`heads_breakdown` (``--heads-only``) times the decode graphs alone.

and the floors: weight bytes / measured copy bandwidth, FLOPs (counted by
``torch.utils.flop_counter``) / measured bf16 matmul rate. Each timing is p50/p90 over ``iters``
runs after warm-up. Run ``python -m rsd.gpu_bench --num-images 1 --out results/gpu/<name>.json`` on a
CUDA machine.
"""

from rsd.gpu_bench.breakdown import full_accept_draft, run_breakdown
from rsd.gpu_bench.cli import format_breakdown, main
from rsd.gpu_bench.heads import heads_breakdown
from rsd.gpu_bench.timing import (GOAL_MS, LIBERO_INSTRUCTION, count_flops, kernel_breakdown, measure_ceilings,
                                  summarize, time_cuda, time_wall)

__all__ = ["measure_ceilings", "time_cuda", "time_wall", "summarize", "count_flops", "kernel_breakdown",
           "full_accept_draft", "run_breakdown", "heads_breakdown", "format_breakdown", "main", "GOAL_MS",
           "LIBERO_INSTRUCTION"]
