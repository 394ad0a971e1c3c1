"""Rendered demonstrations -> the training arrays of a pixel policy (``PixelBackbone``).

Each step ``t`` of a demo is one sample, as for the low-dimensional policy (``rsd.train.policy_data``): the
observation before action ``t`` and the chunk ``actions[t : t + C]`` (padded with the last action), normalized and
tokenized once. The observation is what ``rsd eval`` hands a rendered policy, made from the recorded raw frames by the
same functions, once, here:

    obs/agentview_rgb, obs/eye_in_hand_rgb  raw camera frames (``rsd collect --render``), uint8 [T, h, w, 3]
      -> rsd.images.oft_model_input(frame, center_crop=False)   rotate 180, JPEG q95 round trip, Lanczos to 224
         (= rsd.sim.libero.make_observation's full_image / wrist_image)
      -> rsd.backbones.pixel_views.resize_to_model(..., image_size)   the backbone's own resize to its input side
      -> images uint8 [N, 2, S, S, 3]

The 0.9-area crop is not applied here: :meth:`PixelData.batch` draws random crop boxes from the trainer's per-step
generator (``augment``) and evaluation batches (``augment=None``) get the centre crop, inside the backbone. Frames
recorded at another camera size than the evaluation's 256 px (``rsd collect --camera-size``) go through the same
pipeline but are not the evaluation's pixels: record training demos with ``--camera-size 256``.
"""

from __future__ import annotations

from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from einops import rearrange

from rsd.backbones.lowdim import pad_ids, word_ids
from rsd.backbones.pixel import PixelInputs
from rsd.backbones.pixel_views import random_crop_boxes, resize_to_model
from rsd.errors import ConfigError, ShapeError
from rsd.images import oft_model_input
from rsd.limits import usable_cores
from rsd.train.policy_data import chunk_targets, demo_proprio, tokenize_chunks

__all__ = ["PixelData", "build_pixel_data", "demo_views", "CAMERA_DATASETS"]

CAMERA_DATASETS = ("agentview_rgb", "eye_in_hand_rgb")  # the demo's raw frames of full_image, wrist_image
_STATS_IMAGES = 512  # training samples whose images fit the backbone's pixel statistics


@dataclass
class PixelData:
    """Training arrays (numpy, one row per sample) of a pixel policy."""

    state: np.ndarray  # float32 [N, P]
    images: np.ndarray  # uint8 [N, V, S, S, 3]: full, wrist at the model's size, uncropped
    task_index: np.ndarray  # int64 [N]
    episode: np.ndarray  # int64 [N]
    actions: np.ndarray  # float32 [N, C, A] normalized chunk
    codes: np.ndarray  # uint8 [N, L, C, H]
    instruction_ids: np.ndarray  # int64 [tasks, I]
    instructions: list[str]
    num_episodes: int
    crop: bool  # random-crop augmentation when batch() is given a generator (PixelBackbone center_crop)
    device_images: torch.Tensor | None = field(default=None, repr=False)  # to_device's copy of ``images``

    def __len__(self) -> int:
        return int(self.state.shape[0])

    def fit_backbone(self, backbone: Any, rows: np.ndarray) -> None:
        """Fit ``backbone``'s standardization on the training ``rows`` (pixels: an even subsample of them)."""
        if backbone.image_size != self.images.shape[2] or backbone.center_crop != self.crop:
            raise ConfigError(f"pixel data of {self.images.shape[2]} px (crop={self.crop}) for a PixelBackbone of "
                              f"image_size={backbone.image_size} (center_crop={backbone.center_crop}): build the "
                              f"arrays with the backbone's settings.")
        sample = rows[:: max(1, len(rows) // _STATS_IMAGES)]
        backbone.fit_input_stats(self.state[rows], self.images[sample])

    def to_device(self, device: torch.device | str) -> None:
        """Keep a copy of the images on ``device`` (a GPU: 2 x S x S x 3 bytes a sample, 22.7 GB for the 230,305
        samples at S = 128 of docs/pixel-policy.md), so :meth:`batch` gathers there instead of copying every batch
        from host memory."""
        self.device_images = torch.from_numpy(self.images).to(device)

    def batch(self, rows: np.ndarray | torch.Tensor, augment: np.random.Generator | None = None
              ) -> tuple[PixelInputs, torch.Tensor, torch.Tensor]:
        """Rows -> (inputs, normalized chunk float32 [B, C, A], codes int64 [B, L, C, H]). With ``augment`` (training)
        and ``crop``, a random 0.9-area crop box per view drawn from it; otherwise the backbone's evaluation crop.
        The images come from the device copy when :meth:`to_device` made one (the same values)."""
        rows = np.asarray(rows)
        if self.device_images is not None:
            images = self.device_images[torch.from_numpy(rows).to(self.device_images.device)]
        else:
            images = torch.from_numpy(self.images[rows])
        B, V = images.shape[:2]
        crops = None
        if augment is not None and self.crop:
            crops = rearrange(random_crop_boxes(augment, B * V), "(b v) k -> b v k", b=B)
        inputs = PixelInputs(images, torch.from_numpy(self.state[rows]),
                             torch.from_numpy(self.instruction_ids[self.task_index[rows]]), crops)
        return inputs, torch.from_numpy(self.actions[rows]), torch.from_numpy(self.codes[rows].astype(np.int64))

    def rows_of(self, episodes: Sequence[int]) -> np.ndarray:
        """Sample rows of the given episodes (int64, ascending)."""
        return np.flatnonzero(np.isin(self.episode, np.asarray(list(episodes), dtype=np.int64)))


def _observed(frame: np.ndarray) -> np.ndarray:
    return oft_model_input(frame, center_crop=False)  # = rsd.sim.libero.make_observation's image of a raw frame


def demo_views(demo: Any, image_size: int, pool: Executor | None = None) -> np.ndarray:
    """A rendered demo's raw frames -> uint8 [T, V, S, S, 3], the evaluation's observation images resized to the
    model's ``image_size`` (frames converted in ``pool`` when given: each frame on its own, so the result does not
    depend on it). ShapeError when the demo was recorded without images."""
    missing = [k for k in CAMERA_DATASETS if k not in demo.obs]
    if missing:
        raise ShapeError(f"demo {demo.name!r} ({demo.instruction!r}) has no camera images {missing}: a pixel policy "
                         f"trains on rendered demos; record them with `rsd collect --render --camera-size 256`.")
    views = []
    for key in CAMERA_DATASETS:
        frames = np.asarray(demo.obs[key])
        if frames.ndim != 4 or frames.shape[0] != demo.num_steps or frames.dtype != np.uint8:
            raise ShapeError(f"demo {demo.name!r} obs/{key} must be uint8 [T={demo.num_steps}, h, w, 3], got "
                             f"{frames.dtype} {list(frames.shape)}.")
        observed = np.stack(list((pool.map if pool is not None else map)(_observed, frames)))  # [T, 224, 224, 3]
        views.append(resize_to_model(observed, image_size).numpy())
    return np.stack(views, axis=1)


def build_pixel_data(demos: Sequence[Any], tokenizer: Any, space: Any, *, image_size: int, word_buckets: int,
                     crop: bool, progress: bool = False, threads: int | None = None,
                     views: Iterable[np.ndarray | None] | None = None) -> PixelData:
    """Rendered demos (``rsd.sim.demos.Demo`` read with images) -> :class:`PixelData`. The frames are converted by
    ``threads`` threads (default: the usable cores; the JPEG and resize steps release the GIL: 1.5x on 2 cores).
    ``views``, parallel to ``demos``: a demo's views already at the model's size (uint8 [T, 2, S, S, 3], from
    ``rsd render-demos``: ``rsd.train.render_views.read_views``) used instead of its frames where not None."""
    from tqdm import tqdm

    if not demos:
        raise ConfigError("no demos to build training data from.")
    chunk_len = int(tokenizer.config["chunk_len"])
    tasks: dict[str, int] = {}
    states, task_index, episode, env_chunks = [], [], [], []
    total = sum(d.num_steps for d in demos)
    images = np.empty((total, len(CAMERA_DATASETS), image_size, image_size, 3), np.uint8)  # filled demo by demo
    given = iter(views) if views is not None else None
    start = 0
    with ThreadPoolExecutor(threads or usable_cores()) as pool:
        for e, demo in enumerate(tqdm(demos, desc="demos (images)", disable=not progress, unit="demo")):
            task = tasks.setdefault(demo.instruction, len(tasks))
            state = demo_proprio(demo).astype(np.float32)  # [T, P]
            states.append(state)
            view = next(given) if given is not None else None
            if view is None:
                view = demo_views(demo, image_size, pool)
            elif view.shape != (demo.num_steps, len(CAMERA_DATASETS), image_size, image_size, 3) or view.dtype != np.uint8:
                raise ShapeError(f"views of demo {demo.name!r} must be uint8 [{demo.num_steps}, "
                                 f"{len(CAMERA_DATASETS)}, {image_size}, {image_size}, 3], got {view.dtype} "
                                 f"{list(view.shape)}.")
            images[start:start + len(state)] = view
            start += len(state)
            task_index.append(np.full(len(state), task, np.int64))
            episode.append(np.full(len(state), e, np.int64))
            env_chunks.append(chunk_targets(np.asarray(demo.actions, dtype=np.float64), chunk_len))  # [T, C, A]
    normalized = space.normalize(np.concatenate(env_chunks)).astype(np.float32)  # [N, C, A]
    return PixelData(state=np.concatenate(states), images=images,
                     task_index=np.concatenate(task_index), episode=np.concatenate(episode), actions=normalized,
                     codes=tokenize_chunks(tokenizer, normalized),
                     instruction_ids=pad_ids([word_ids(t, word_buckets) for t in tasks]), instructions=list(tasks),
                     num_episodes=len(demos), crop=crop)
