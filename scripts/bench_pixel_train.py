"""Time training steps of the pixel policy (backbone + RFSQ, draft and L1 heads, their losses, AdamW) on random
inputs of the real shapes, float32 and bf16 autocast, to choose `rsd train-policy --steps` for a time budget.

    python scripts/bench_pixel_train.py --device cuda --batch-sizes 256,512 --steps 30

Prints one JSON line per (batch size, precision): milliseconds per step (median over --steps after 5 warm-up
steps), samples per second, peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rsd.backbones.pixel import PixelInputs
from rsd.config import RSDConfig
from rsd.policy.roundtrip import DEFAULT_TOKENIZER_DIR
from rsd.tokenizer import RFSQTokenizer
from rsd.train.policy import PolicyModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-sizes", default="256,512")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    tok = RFSQTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR).config  # the shapes rsd train-policy trains
    cfg = RSDConfig(chunk_len=tok["chunk_len"], action_dim=tok["action_dim"], latent_dim=tok["latent_dim"],
                    num_layers=tok["num_layers"], num_levels=tok["num_levels"], tokenizer_width=tok["width"],
                    hidden_dim=256, head_width=128, draft_layers=3)
    S = args.image_size
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for amp in (False, True):
            torch.manual_seed(0)
            model = PolicyModel(cfg, {"hidden_dim": 256, "image_size": S, "channels": 32, "width": 128,
                                      "word_buckets": 512, "center_crop": True}, "pixel").to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            inputs = PixelInputs(torch.randint(0, 256, (batch, 2, S, S, 3), dtype=torch.uint8, device=device),
                                 torch.randn(batch, 8, device=device),
                                 torch.randint(1, 512, (batch, 8), device=device),
                                 torch.tensor([0.02, 0.03, 0.9487], device=device).expand(batch, 2, 3).contiguous())
            actions = torch.randn(batch, cfg.chunk_len, cfg.action_dim, device=device)
            codes = torch.randint(0, cfg.num_levels, (batch, cfg.num_layers, cfg.chunk_len, cfg.latent_dim),
                                  device=device)
            times = []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for i in range(args.steps + 5):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = model.losses(inputs, actions, codes)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= 5:
                    times.append(1e3 * (time.perf_counter() - t0))
            ms = statistics.median(times)
            print(json.dumps({"batch": batch, "amp": amp, "ms_per_step": round(ms, 2),
                              "samples_per_s": round(batch / ms * 1e3),
                              "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                              if device.type == "cuda" else None, "device": str(device)}), flush=True)


if __name__ == "__main__":
    main()
