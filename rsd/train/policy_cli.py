"""``rsd train-policy``: train a policy (RFSQ main head + draft + L1 head on one backbone).

``--backbone lowdim`` (the default): ``LowDimBackbone``, proprio + object poses + instruction.
``--backbone pixel``: ``PixelBackbone``, both camera views + proprio + instruction (OpenVLA-OFT's observation);
its demos must be rendered (``rsd collect --render --camera-size 256``), their frames become the evaluation's
observation images once (``rsd.train.pixel_data``), and training crops them at random (``--crop``).

1. read the demos (LIBERO-layout HDF5 recorded by ``rsd collect``: proprio, object poses, actions[, images]);
2. hold out ``--val-fraction`` of the *episodes* (a seeded permutation, never frames), optionally keep only the
   first ``--episodes-per-task`` training episodes of each task (the data-scaling runs share one held-out set);
3. warn (stderr) where the tokenizer's action space clips more than 5 % of a task's actions in some dim
   (``rsd.train.clipping``: values no policy trained on it can command; ``clipping`` in ``train.json``);
   normalize and tokenize the chunks with ``--tokenizer`` (default: the packaged one) and train
   (``rsd.train.policy``: progress bar, periodic checkpoints in ``OUT/checkpoint``, ``--resume`` continues them);
4. write ``OUT/rsd`` (an RSD policy: ``rsd eval --policy OUT/rsd``) and ``OUT/l1`` (its L1 sibling, the same
   backbone), ``OUT/train.json`` (held-out token accuracy per layer, the draft's, the L1 error, the command) and
   ``OUT/curve.json`` + ``OUT/curve.png``.

    rsd train-policy --demos runs/demos/libero_spatial.hdf5 runs/demos/libero_object.hdf5 --out runs/policy/lowdim
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from rsd.errors import ConfigError

__all__ = ["HELP", "add_arguments", "run", "train_policy", "limit_per_task"]

HELP = "train an RSD policy (RFSQ + draft + L1 heads; low-dimensional or pixel backbone) on recorded demos"
PIXEL_DEFAULTS = {"image_size": 128, "channels": 32, "width": 128, "center_crop": True}  # --backbone pixel
REPORT_NAME, CURVE_NAME = "train.json", "curve.json"


def limit_per_task(demos: Sequence[Any], indices: Sequence[int], per_task: int | None) -> list[int]:
    """The first ``per_task`` of ``indices`` for each instruction (in the given order); all when None."""
    if per_task is None:
        return list(indices)
    if per_task < 1:
        raise ConfigError(f"--episodes-per-task must be >= 1, got {per_task}.")
    seen: dict[str, int] = {}
    kept = []
    for i in indices:
        task = demos[i].instruction
        if seen.get(task, 0) < per_task:
            seen[task] = seen.get(task, 0) + 1
            kept.append(i)
    short = {t: n for t, n in seen.items() if n < per_task}
    if short:
        raise ConfigError(f"--episodes-per-task {per_task}: these tasks have fewer training episodes: {short}.")
    return kept


def train_policy(demo_files: Sequence[Path], out: Path, config: Any, *, tokenizer_dir: Path | None = None,
                 val_fraction: float = 0.1, split_seed: int = 0, episodes_per_task: int | None = None,
                 resume: bool = False, progress: bool = True, command: str = "",
                 time_limit_s: float | None = None) -> dict[str, Any]:
    """Train and save (module docstring); returns the report (also ``OUT/train.json``)."""
    import torch

    from rsd.action_space import ActionSpace
    from rsd.config import RSDConfig
    from rsd.policy.learned import L1Policy, RSDPolicy
    from rsd.policy.roundtrip import DEFAULT_TOKENIZER_DIR
    from rsd.sim.demos import read_demo_files
    from rsd.tokenizer import RFSQTokenizer
    from rsd.train.clipping import clipping_by_task, clipping_warnings
    from rsd.train.policy import Trainer, evaluate_heads
    from rsd.train.policy_data import build_policy_data
    from rsd.train.tokenizer_cli import split_by_episode

    tokenizer_dir = Path(tokenizer_dir or DEFAULT_TOKENIZER_DIR)
    tokenizer = RFSQTokenizer.from_pretrained(tokenizer_dir)
    space = ActionSpace.load(tokenizer_dir)
    tok = tokenizer.config
    rsd_config = RSDConfig(chunk_len=tok["chunk_len"], action_dim=tok["action_dim"], latent_dim=tok["latent_dim"],
                           num_layers=tok["num_layers"], num_levels=tok["num_levels"], tokenizer_width=tok["width"],
                           hidden_dim=config.backbone["hidden_dim"], head_width=config.head_width,
                           draft_layers=config.draft_layers)
    pixel = config.backbone_name == "pixel"
    recorded = read_demo_files(demo_files, images=pixel)
    demos = [d for _, d in recorded]
    origin = [f"{path.name}:{d.name}" for path, d in recorded]
    train_eps, val_eps = split_by_episode(len(demos), val_fraction, split_seed)
    train_eps = limit_per_task(demos, train_eps, episodes_per_task)
    used = sorted(train_eps + val_eps)
    clipping = clipping_by_task([demos[i] for i in used], space)  # what the tokenizer's action space cannot represent
    for line in clipping_warnings(clipping, space, fix=f"Refit the tokenizer ({tokenizer_dir}) with `rsd "
                                  f"train-tokenizer --normalization bounds` on demos that include these."):
        print(line, file=sys.stderr)
    if pixel:
        from rsd.train.pixel_data import build_pixel_data

        chosen = [recorded[i] for i in used]
        data = build_pixel_data([d for _, d in chosen], tokenizer, space,
                                image_size=config.backbone["image_size"], word_buckets=config.backbone["word_buckets"],
                                crop=config.backbone["center_crop"], progress=progress,
                                views=_rendered_views(chosen, config.backbone["image_size"]))
        if torch.device(config.device).type == "cuda":
            data.to_device(config.device)  # batches gathered on the GPU (rsd.train.pixel_data.PixelData.to_device)
    else:
        data = build_policy_data([demos[i] for i in used], tokenizer, space,
                                 word_buckets=config.backbone["word_buckets"], progress=progress)
    position = {e: j for j, e in enumerate(used)}  # demo index -> episode id inside `data`
    train_rows = data.rows_of([position[e] for e in train_eps])
    val_rows = data.rows_of([position[e] for e in val_eps])
    meta = {"data": {"demos": [Path(p).name for p in demo_files], "train": [origin[i] for i in train_eps],
                     "val": [origin[i] for i in val_eps], "episodes_per_task": episodes_per_task,
                     "split_seed": split_seed, "val_fraction": val_fraction},
            "tokenizer": {"config": tok, "action_stats": space.stats.to_dict(), "normalization": space.normalization}}

    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, rsd_config, data, train_rows, val_rows, tokenizer, out, meta=meta)
    if resume:
        trainer.load_checkpoint()
    t0 = time.perf_counter()
    completed = trainer.train(progress=progress, time_limit_s=time_limit_s)
    model = trainer.model.eval()
    final = evaluate_heads(model, data, val_rows, tokenizer) if len(val_rows) else None

    backbone = model.backbone.to("cpu")
    rsd_policy = RSDPolicy(backbone, model.head.to("cpu"), tokenizer, space.stats, config=rsd_config,
                           draft=model.draft.to("cpu"), speculative=False, action_normalization=space.normalization)
    rsd_policy.save_pretrained(out / "rsd")
    L1Policy(backbone, model.l1.to("cpu"), space.stats, config=rsd_config,
             action_normalization=space.normalization).save_pretrained(out / "l1")
    report = {
        "command": command, "train_config": asdict(config), "rsd_config": rsd_config.to_dict(),
        "tokenizer_dir": str(tokenizer_dir), "data": {**meta["data"], "train": len(train_eps), "val": len(val_eps),
                                                      "train_samples": int(len(train_rows)),
                                                      "val_samples": int(len(val_rows)),
                                                      "tasks": data.instructions},
        "split": {"train": meta["data"]["train"], "val": meta["data"]["val"]},
        "clipping": clipping,
        "final_val": final, "steps": trainer.step, "completed": completed, "wall_seconds_this_run": time.perf_counter() - t0,
        "device": str(config.device), "torch": torch.__version__,
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in
                       (("backbone", model.backbone), ("rsd_head", model.head), ("draft", model.draft),
                        ("l1_head", model.l1))},
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    (out / CURVE_NAME).write_text(json.dumps(trainer.curve, indent=2) + "\n")
    plot_curve(trainer.curve, out / "curve.png", title=f"rsd train-policy: {', '.join(meta['data']['demos'])}")
    return report


def _rendered_views(chosen: Sequence[tuple[Path, Any]], image_size: int) -> Iterator[np.ndarray | None]:
    """Per demo: None where it holds its camera frames, else its views from ``rsd render-demos``'s file beside the
    demo file (``rsd.train.render_views.read_views``: refused when missing or made from another version)."""
    from rsd.train.pixel_data import CAMERA_DATASETS
    from rsd.train.render_views import read_views

    for path, group in itertools.groupby(chosen, key=lambda item: item[0]):
        demos = [d for _, d in group]
        need = {d.name for d in demos if any(k not in d.obs for k in CAMERA_DATASETS)}
        rendered = read_views(path, [d.name for d in demos if d.name in need], image_size) if need else iter(())
        for d in demos:
            yield next(rendered) if d.name in need else None


def plot_curve(curve: Sequence[dict[str, Any]], path: Path, *, title: str) -> None:
    """Training losses and held-out token accuracy / L1 error against steps, one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [e["step"] for e in curve]
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for key in ("ce_main", "ce_draft", "l1"):
        ax1.plot(steps, [e["train"][key] for e in curve], label=f"train {key}")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_title("training losses")
    ax1.legend()
    val = [e for e in curve if "val" in e]
    if val:
        vs = [e["step"] for e in val]
        layers = np.array([e["val"]["token_accuracy_greedy"] for e in val])  # [E, L]
        for layer in range(layers.shape[1]):
            ax2.plot(vs, layers[:, layer], label=f"layer {layer}", alpha=0.8)
        ax2.plot(vs, [e["val"]["token_accuracy_greedy_mean"] for e in val], "k-", lw=2, label="mean")
        ax2.set_ylim(0, 1)
        ax2.set_xlabel("step")
        ax2.set_title("held-out greedy token accuracy")
        ax2.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rsd.train.policy import BACKBONES, TrainConfig

    d = TrainConfig()
    parser.add_argument("--demos", type=Path, nargs="+", required=True, help="HDF5 demos recorded by `rsd collect`")
    parser.add_argument("--out", type=Path, required=True, help="output directory (policies, report, checkpoint)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="RFSQ tokenizer directory (default: packaged)")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--seed", type=int, default=d.seed, help="weights, batches (the split has --split-seed)")
    parser.add_argument("--split-seed", type=int, default=0, help="which episodes are held out")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="episodes held out (split by episode)")
    parser.add_argument("--episodes-per-task", type=int, default=None,
                        help="train on only the first N training episodes of each task (data scaling)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--backbone", choices=BACKBONES, default=d.backbone_name,
                        help="lowdim: object poses + proprio + instruction (no images); pixel: both camera views + "
                             "proprio + instruction, from demos recorded with `rsd collect --render`")
    parser.add_argument("--hidden-dim", type=int, default=d.backbone["hidden_dim"])
    parser.add_argument("--width", type=int, default=None,
                        help=f"backbone token / branch width (default lowdim {d.backbone['width']}, "
                             f"pixel {PIXEL_DEFAULTS['width']})")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"pixel: the conv stack's input side S (default {PIXEL_DEFAULTS['image_size']}; the "
                             f"224 px observation is resized to it)")
    parser.add_argument("--channels", type=int, default=None,
                        help=f"pixel: channels of the first conv stage (x1, 2, 4, 4 over 4 stages; default "
                             f"{PIXEL_DEFAULTS['channels']})")
    parser.add_argument("--crop", action=argparse.BooleanOptionalAction, default=None,
                        help="pixel: random 0.9-area crop of each view in training, centre crop at evaluation "
                             "(OpenVLA-OFT's; default on); --no-crop: neither")
    parser.add_argument("--layers", type=int, default=None,
                        help=f"lowdim: backbone Transformer layers (default {d.backbone['layers']})")
    parser.add_argument("--word-buckets", type=int, default=d.backbone["word_buckets"],
                        help="hash buckets of the word table (instruction and object names)")
    parser.add_argument("--motion", action=argparse.BooleanOptionalAction, default=None,
                        help="lowdim: the backbone also reads how the proprio moved since the previous chunk began "
                             "(LowDimBackbone motion: tells a stalled arm from a moving one; default on)")
    parser.add_argument("--head-width", type=int, default=d.head_width, help="W of the RFSQ, draft and L1 heads")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="stop after this many seconds of training, save everything (completed: false); "
                             "--resume continues")
    parser.add_argument("--draft-layers", type=int, default=d.draft_layers, help="k: layers the draft head proposes")
    parser.add_argument("--amp", action="store_true",
                        help="bf16 autocast of the training forward pass (CUDA only; evaluation stays float32)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same settings)")
    parser.add_argument("--overwrite", action="store_true", help="train into an OUT that already holds a run")
    parser.add_argument("--no-progress", action="store_true")


def backbone_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The backbone's kwargs from the command line; ConfigError for an option of the other backbone."""
    from rsd.train.policy import TrainConfig

    lowdim = TrainConfig().backbone
    only = {"lowdim": ("layers", "motion"), "pixel": ("image_size", "channels", "crop")}
    other = "pixel" if args.backbone == "lowdim" else "lowdim"
    wrong = [f"--{name.replace('_', '-')}" for name in only[other] if getattr(args, name) is not None]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} configure the {other} backbone; with --backbone {args.backbone} "
                          f"leave them out (or pass --backbone {other}).")

    def pick(name: str, default: Any) -> Any:
        return default if getattr(args, name) is None else getattr(args, name)

    if args.backbone == "lowdim":
        return {"hidden_dim": args.hidden_dim, "width": pick("width", lowdim["width"]),
                "layers": pick("layers", lowdim["layers"]), "heads": 4, "word_buckets": args.word_buckets,
                "motion": pick("motion", lowdim["motion"])}
    return {"hidden_dim": args.hidden_dim, "image_size": pick("image_size", PIXEL_DEFAULTS["image_size"]),
            "channels": pick("channels", PIXEL_DEFAULTS["channels"]), "width": pick("width", PIXEL_DEFAULTS["width"]),
            "word_buckets": args.word_buckets, "center_crop": pick("crop", PIXEL_DEFAULTS["center_crop"])}


def run(args: argparse.Namespace) -> int:
    from rsd.policy.factory import check_device
    from rsd.train.policy import CHECKPOINT_DIR, TrainConfig

    check_device(args.device)
    if args.out.exists() and any(args.out.iterdir()) and not (args.resume or args.overwrite):
        raise ConfigError(f"{args.out} is not empty; pass --resume to continue its checkpoint, --overwrite to train "
                          f"over it, or choose another --out.")
    if args.resume and not (args.out / CHECKPOINT_DIR).is_dir():
        raise ConfigError(f"--resume: {args.out / CHECKPOINT_DIR} does not exist; start without --resume.")
    config = TrainConfig(backbone_name=args.backbone, backbone=backbone_kwargs(args), steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_steps=args.warmup_steps, seed=args.seed, eval_every=args.eval_every,
                         checkpoint_every=args.checkpoint_every, device=args.device,
                         head_width=args.head_width,
                         draft_layers=args.draft_layers, amp=args.amp)
    report = train_policy(args.demos, args.out, config, tokenizer_dir=args.tokenizer, val_fraction=args.val_fraction,
                          split_seed=args.split_seed, episodes_per_task=args.episodes_per_task, resume=args.resume,
                          progress=not args.no_progress, command=shlex.join(["rsd", *sys.argv[1:]]),
                          time_limit_s=args.time_limit_s)
    final = report["final_val"]
    if final:
        acc = " ".join(f"{a:.3f}" for a in final["token_accuracy_greedy"])
        print(f"held-out ({report['data']['val']} episodes, {final['samples']} chunks): greedy token accuracy per "
              f"layer {acc} (mean {final['token_accuracy_greedy_mean']:.3f}); draft "
              f"{' '.join(f'{a:.3f}' for a in final['draft_accuracy'])}; L1 |err| {final['l1_mae']:.4f}, "
              f"RSD greedy |err| {final['rsd_greedy_mae']:.4f} (normalized units)")
    if not report["completed"]:
        print(f"stopped by --time-limit-s at step {report['steps']} of {args.steps}; --resume continues")
    print(f"wrote {args.out}/rsd and {args.out}/l1 (rsd eval --policy DIR), train.json, curve.json, curve.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from rsd.cli import main

    sys.exit(main(["train-policy", *sys.argv[1:]]))
