"""``rsd train-tokenizer``: fit the RFSQ tokenizer on the action chunks of recorded demos.

1. read the demos (``rsd.sim.demos``: LIBERO-layout HDF5, ours or LIBERO's own files);
2. hold out ``--val-fraction`` of the *episodes* (a seeded permutation), so no validation chunk overlaps a
   training chunk;
3. statistics of the training episodes' actions (gripper in model convention, masked) and the normalization
   kind, ``--normalization bounds`` (min/max, the default) or ``bounds_q99`` (OpenVLA-OFT's q01/q99):
   ``action_stats.json`` (``rsd.action_space``). How much of each task's actions the kind clips (values no policy
   using these statistics can command) is reported per task and dim, with a warning above 5 %;
4. sliding windows of ``--chunk-len`` consecutive actions (``rsd.sim.demos.action_chunks``), normalized,
   fitted with ``rsd.train.tokenizer.fit_tokenizer``;
5. writes ``tokenizer.safetensors`` + ``tokenizer.json`` + ``action_stats.json`` + ``report.json`` (per-dim MSE
   in normalized and env units, MSE by number of layers, code usage per layer, the split) and prints them.

    rsd train-tokenizer --demos runs/demos/spatial.hdf5 --out rsd/assets/tokenizer_libero --steps 3000
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from einops import reduce

from rsd.errors import ConfigError
from rsd.train.clipping import DIM_NAMES, clipping_by_task, clipping_warnings

__all__ = ["HELP", "add_arguments", "run", "split_by_episode", "train_tokenizer"]

HELP = "fit the RFSQ tokenizer on recorded action chunks"
REPORT_NAME = "report.json"


def split_by_episode(num_demos: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Demo indices ``(train, val)``: a seeded permutation, ``round(val_fraction * n)`` (at least 1 when the
    fraction is positive) episodes held out. Raises if that leaves no training episode."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    if num_demos < 1:
        raise ConfigError("no demos to train on.")
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * num_demos))
    if n_val >= num_demos:
        raise ConfigError(f"--val-fraction {val_fraction} of {num_demos} demos leaves no training episode; "
                          f"record more demos or lower it.")
    order = np.random.default_rng(seed).permutation(num_demos)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


def _env_metrics(tokenizer: Any, space: Any, env_chunks: np.ndarray) -> dict[str, Any]:
    """Round trip in env units: per-dim MSE of the arm dims, gripper sign flips. ``env_chunks`` ``[N, C, A]``."""
    import torch

    norm = torch.from_numpy(space.normalize(env_chunks))
    with torch.inference_mode():
        recon = tokenizer.decode_from_indices(tokenizer.encode(norm)).numpy()  # [N, C, A]
    back = space.to_env(recon)
    err = (back[..., :-1] - env_chunks[..., :-1]) ** 2
    return {
        "mse_per_dim_env": [float(v) for v in reduce(err, "n c a -> a", "mean")],  # arm dims only
        "max_abs_error_env": float(np.sqrt(err.max())),
        "gripper_flip_rate": float(np.mean(np.sign(back[..., -1]) != np.sign(env_chunks[..., -1]))),
    }


def train_tokenizer(demo_files: Sequence[Path], out: Path, *, steps: int = 3000, batch_size: int = 256,
                    lr: float = 1e-3, val_fraction: float = 0.1, seed: int = 0, chunk_len: int | None = None,
                    sizes: dict[str, int] | None = None, progress: bool = True, command: str = "",
                    normalization: str = "bounds") -> dict[str, Any]:
    """Fit and save a tokenizer (see the module docstring); returns the report dict (also in report.json)."""
    import torch

    from rsd.action_space import ActionSpace
    from rsd.config import RSDConfig
    from rsd.sim.demos import action_chunks, read_demo_files
    from rsd.tokenizer import RFSQTokenizer
    from rsd.train.tokenizer import fit_tokenizer

    # sizes first: a bad --chunk-len etc. is refused before any demo is read (None = RSDConfig's default)
    cfg = RSDConfig(**({"chunk_len": chunk_len} if chunk_len is not None else {}), **(sizes or {}))
    recorded = read_demo_files(demo_files)
    demos = [d for _, d in recorded]
    origin = [f"{path}:{d.name}" for path, d in recorded]
    train_idx, val_idx = split_by_episode(len(demos), val_fraction, seed)
    train_demos = [demos[i] for i in train_idx]
    val_demos = [demos[i] for i in val_idx]

    space = ActionSpace.fit(np.concatenate([d.actions for d in train_demos]),
                            source={"demos": [str(p) for p in demo_files], "train_episodes": len(train_demos),
                                    "train_steps": int(sum(d.num_steps for d in train_demos))},
                            normalization=normalization)
    train_env = action_chunks(train_demos, cfg.chunk_len)  # [N, C, A] env units
    val_env = action_chunks(val_demos, cfg.chunk_len) if val_demos else None

    torch.manual_seed(seed)  # the tokenizer's initial weights (nn.Module default init)
    tokenizer = RFSQTokenizer.from_config(cfg)
    fit = fit_tokenizer(tokenizer, space.normalize(train_env), steps=steps, batch_size=batch_size, lr=lr,
                        val_chunks=None if val_env is None else space.normalize(val_env), seed=seed,
                        progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    space.save(out)
    report = {
        "command": command,
        "fit": fit.to_dict(),
        "env_units": {"train": _env_metrics(tokenizer, space, train_env),
                      "val": None if val_env is None else _env_metrics(tokenizer, space, val_env)},
        "split": {"seed": seed, "val_fraction": val_fraction, "train": [origin[i] for i in train_idx],
                  "val": [origin[i] for i in val_idx]},
        "chunks": {"train": int(train_env.shape[0]), "val": 0 if val_env is None else int(val_env.shape[0]),
                   "chunk_len": cfg.chunk_len, "windows": "sliding, stride 1, inside one episode"},
        "tokenizer": tokenizer.config,
        "normalization": space.normalization,
        "clipping": clipping_by_task(demos, space),  # every episode, training and held out
    }
    for line in clipping_warnings(report["clipping"], space):
        print(line, file=sys.stderr)
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    fit = report["fit"]
    lines = [f"chunks: train {report['chunks']['train']}, val {report['chunks']['val']} "
             f"({len(report['split']['train'])} / {len(report['split']['val'])} episodes); "
             f"{fit['steps']} steps in {fit['wall_seconds']:.1f} s"]
    splits = [(name, fit[name], report["env_units"][name]) for name in ("train", "val") if fit[name] is not None]
    lines.append(f"{'dim':>8}" + "".join(f"  {name + ' mse(norm)':>16}  {name + ' mse(env)':>15}"
                                          for name, _, _ in splits))
    for a, dim in enumerate(DIM_NAMES):
        row = f"{dim:>8}"
        for _, m, env in splits:
            env_v = env["mse_per_dim_env"][a] if a < len(env["mse_per_dim_env"]) else float("nan")
            row += f"  {m['mse_per_dim'][a]:>16.3e}  " + (f"{env_v:>15.3e}" if not math.isnan(env_v) else f"{'-':>15}")
        lines.append(row)
    for name, m, env in splits:
        lines.append(f"{name}: mse {m['mse']:.3e}; gripper flips {100 * env['gripper_flip_rate']:.2f}%; "
                     f"max |arm error| {env['max_abs_error_env']:.3e} (env units)")
    if "clipping" in report:
        worst = max(((frac, dim, task) for task, e in report["clipping"].items()
                     for dim, frac in e["clipped_fraction"].items()), default=None)
        if worst is not None and worst[0] == 0.0:
            lines.append(f"{report['normalization']}: no recorded action lies outside the normalization's bounds")
        elif worst is not None:
            lines.append(f"{report['normalization']}: most clipped {100 * worst[0]:.2f} % of the {worst[1]} actions of "
                         f"{worst[2]!r} (values no policy with these statistics can command)")
    ref = fit["val"] or fit["train"]
    lines.append("layer  levels used  perplexity  mse decoding layers 0..l")
    for layer, (used, usage, mse) in enumerate(zip(ref["levels_used"], ref["usage"], ref["mse_by_layers"])):
        p = np.asarray(usage)
        ppl = float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
        lines.append(f"{layer:>5}  {used:>11}  {ppl:>10.2f}  {mse:.3e}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demos", type=Path, nargs="+", required=True, help="LIBERO-layout HDF5 demo file(s)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the tokenizer and its files")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--val-fraction", type=float, default=0.1, help="episodes held out for validation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-len", type=int, default=None, help="C (default: RSDConfig's 8)")
    parser.add_argument("--latent-dim", type=int, default=None, help="H (default 16)")
    parser.add_argument("--num-layers", type=int, default=None, help="L (default 8)")
    parser.add_argument("--num-levels", type=int, default=None, help="G (default 7)")
    parser.add_argument("--width", type=int, default=None, help="encoder/decoder MLP width (default 64)")
    parser.add_argument("--normalization", choices=("bounds", "bounds_q99"), default="bounds",
                        help="action normalization: bounds (min/max of the training actions, every recorded value "
                             "stays reachable) or bounds_q99 (OpenVLA-OFT's q01/q99: clips each dim's rarest 1 %%, "
                             "which for a motion only one task makes can be most of that task's values)")
    parser.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from rsd.tokenizer import CONFIG_NAME

    if (args.out / CONFIG_NAME).exists() and not args.overwrite:
        raise ConfigError(f"{args.out} already holds a tokenizer; pass --overwrite or choose another --out.")
    sizes = {k: v for k, v in (("latent_dim", args.latent_dim), ("num_layers", args.num_layers),
                               ("num_levels", args.num_levels), ("tokenizer_width", args.width)) if v is not None}
    report = train_tokenizer(args.demos, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             val_fraction=args.val_fraction, seed=args.seed, chunk_len=args.chunk_len, sizes=sizes,
                             progress=not args.no_progress, command=shlex.join(["rsd", *sys.argv[1:]]),
                             normalization=args.normalization)
    print(format_report(report))
    print(f"wrote {args.out}/ (tokenizer.safetensors, tokenizer.json, action_stats.json, {REPORT_NAME})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from rsd.cli import main

    sys.exit(main(["train-tokenizer", *sys.argv[1:]]))
