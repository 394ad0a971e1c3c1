"""`PixelBackbone`: both camera views + proprio + instruction -> hidden [B, D], the OpenVLA-OFT observation contract.

It reads what OpenVLA-OFT reads on LIBERO (``rsd.observation``): ``full_image`` and ``wrist_image``, uint8
[224, 224, 3] made by OFT's pipeline (rotate 180, JPEG round trip, Lanczos; no centre crop), the 8-d ``state``,
and the instruction. No privileged object pose::

    instruction   words + bigrams -> stable hash -> Embedding (mean; lowdim's word_ids)            -> e [B, W]
    each view v   224 px -> resize_to_model -> S px -> 0.9-area crop (pixel_views) -> (x - mean) / std
                  -> stem conv /2 -> 4 residual stages (GroupNorm), each followed by FiLM:
                     x <- x * (1 + gamma_s(e + view_v)) + beta_s(e + view_v)
                  -> spatial softmax (expected x, y per channel) + global mean -> Linear           -> [B, W]
    proprio       standardized state -> MLP                                                        -> [B, W]
    concat(full, wrist, instruction, proprio) -> LayerNorm -> Linear -> GELU -> Linear           -> hidden [B, D]

Choices:
- **One conv stack for both views** (shared weights), told apart by a learned view embedding added to the FiLM
  input. The two cameras differ, but the low-level filters they need do not; sharing halves the encoder's weights
  and gives every filter the gradient of both views, which matters with LIBERO's few hundred demos per suite.
- **FiLM after every stage**, not only at the end: the instruction can then select which object's features survive
  from the early, local stages on (the same scene holds the bowl it must pick and the one it must not). The FiLM
  projection starts at zero, so an untrained backbone is the plain conv stack.
- **Spatial softmax + mean**: the expected image position of each channel (where things are, what the actions
  depend on) and its mean activation (whether something is there).
- **GroupNorm**, not BatchNorm: a batch of one at evaluation behaves as in training, and resume stays bit-exact.
- **Image size S** (``image_size``, default 128): the model's input side. The observation stays OFT's 224 px
  contract; :func:`rsd.backbones.pixel_views.resize_to_model` brings it to S, once per image, at evaluation here
  and when the training arrays are built (``rsd.train.pixel_data``), so both see the same pixels.
- **Crop** (``center_crop``, default True): trained with a random 0.9-area crop per view and evaluated with the
  centre crop of the same area, as OpenVLA-OFT does (``rsd.backbones.pixel_views``); False: never cropped.

The image (per channel) and proprio standardization statistics are buffers fitted on training data
(:meth:`PixelBackbone.fit_input_stats`) and saved with the weights (``backbone.safetensors``, strict loading).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import nn

from rsd.backbones.base import (WEIGHTS_FILE, StateDictWeights, check_hidden, instructions_for_batch,
                                observation_batch, register_backbone)
from rsd.backbones.lowdim import mean_embedding, pad_ids, word_ids
from rsd.backbones.pixel_views import CROP_AREA, crop_and_resize, resize_to_model, views_boxes
from rsd.errors import ConfigError, DTypeError, ShapeError
from rsd.images import IMAGE_SIZE
from rsd.observation import IMAGE_KEYS, ObservationSpec

__all__ = ["PixelBackbone", "PixelInputs", "pixel_inputs", "WEIGHTS_FILE"]

_STAGES = (1, 2, 4, 4)  # channel multipliers of the 4 stages
_STRIDES = (1, 2, 2, 2)  # with the stem's /2: S / 16 at the end (8 x 8 at S = 128)


@dataclass(frozen=True)
class PixelInputs:
    """A batch of model inputs: ``images`` uint8 [B, V, S, S, 3] (model size, uncropped; V = 2: full, wrist),
    ``state`` float32 [B, P], ``instruction_ids`` int64 [B, I] (0 = padding), ``crops`` float32 [B, V, 3]
    ``(top, left, side)`` boxes or None (the centre crop, or none for a backbone without ``center_crop``)."""

    images: torch.Tensor
    state: torch.Tensor
    instruction_ids: torch.Tensor
    crops: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8:
            raise DTypeError(f"pixel inputs: images must be uint8 [B, V, S, S, 3], got {self.images.dtype}.")
        B = self.images.shape[0]
        if (self.images.ndim != 5 or self.images.shape[-1] != 3 or self.state.ndim != 2 or self.state.shape[0] != B
                or self.instruction_ids.shape[0] != B
                or (self.crops is not None and self.crops.shape != (B, self.images.shape[1], 3))):
            raise ShapeError(f"pixel inputs disagree: images {list(self.images.shape)} (want [B, V, S, S, 3]), state "
                             f"{list(self.state.shape)}, instruction {list(self.instruction_ids.shape)}, crops "
                             f"{None if self.crops is None else list(self.crops.shape)} (want [B, V, 3]).")

    def to(self, device: torch.device | str) -> "PixelInputs":
        return PixelInputs(self.images.to(device), self.state.to(device), self.instruction_ids.to(device),
                           None if self.crops is None else self.crops.to(device))


def pixel_inputs(observation: dict, instruction: str | list[str], spec: ObservationSpec, image_size: int,
                 num_buckets: int) -> PixelInputs:
    """One observation dict of the image contract (unbatched or batched) + instruction(s) -> :class:`PixelInputs`
    (images resized to the model's ``image_size``; no crop boxes: the backbone's evaluation crop)."""
    images, state = observation_batch(observation, spec)  # ShapeError / DTypeError / NonFiniteError naming the key
    views = torch.stack([resize_to_model(image, image_size) for image in images], dim=1)  # [B, V, S, S, 3]
    texts = instructions_for_batch(instruction, state.shape[0])
    return PixelInputs(views, state, torch.from_numpy(pad_ids([word_ids(t, num_buckets) for t in texts])))


class _ResBlock(nn.Module):
    """conv3x3 (stride) -> GN -> GELU -> conv3x3 -> GN, plus a 1x1 (stride) shortcut when the shape changes; GELU."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(groups, c_out),
                                  nn.GELU(), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.GroupNorm(groups, c_out))
        self.skip = (nn.Identity() if c_in == c_out and stride == 1 else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(groups, c_out)))
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


def _spatial_softmax(x: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N, 3C]: per channel the softmax-weighted mean x and y (in [-1, 1]) and the mean activation."""
    n, c, h, w = x.shape
    weights = torch.softmax(rearrange(x, "n c h w -> n c (h w)"), dim=-1)  # [N, C, hw]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                            indexing="ij")
    coords = rearrange(torch.stack([xs, ys], dim=-1), "h w k -> (h w) k")  # [hw, 2]
    keypoints = rearrange(weights @ coords, "n c k -> n (c k)")  # [N, 2C]
    return torch.cat([keypoints, x.mean(dim=(2, 3))], dim=-1)


@register_backbone("pixel")
class PixelBackbone(StateDictWeights, nn.Module):
    """Two camera views + proprio + instruction -> hidden float32 [B, D] (module docstring).

    Args:
        hidden_dim: D. image_size: S, the conv stack's input side (the observation stays 224 px).
        channels: the first stage's channels (stages: 1, 2, 4, 4 times it); a multiple of 8 (GroupNorm of 8 groups).
        width: W, the width of each branch (view, instruction, proprio) and of the FiLM input.
        word_buckets: hash buckets of the instruction's word table. proprio_dim: P (8 on LIBERO).
        center_crop: random 0.9-area crop at training, centre crop at evaluation (OpenVLA-OFT's); False: no crop.
        seed: weights initialised under ``torch.manual_seed(seed)`` in a forked RNG.
    """

    backbone_name: str  # set by @register_backbone
    reads_images = True  # rsd eval renders for it

    def __init__(self, hidden_dim: int = 256, image_size: int = 128, channels: int = 32, width: int = 128,
                 word_buckets: int = 512, proprio_dim: int = 8, center_crop: bool = True, seed: int | None = 0) -> None:
        super().__init__()
        for name, value, low in (("hidden_dim", hidden_dim, 1), ("image_size", image_size, 32),
                                 ("channels", channels, 8), ("width", width, 8), ("word_buckets", word_buckets, 1),
                                 ("proprio_dim", proprio_dim, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"PixelBackbone `{name}` must be an int >= {low}, got {value!r}.")
        if image_size > IMAGE_SIZE:
            raise ConfigError(f"PixelBackbone `image_size` {image_size} is larger than the observation's "
                              f"{IMAGE_SIZE} px: upsampling adds no information; use <= {IMAGE_SIZE}.")
        if channels % 8:
            raise ConfigError(f"PixelBackbone `channels` ({channels}) must be a multiple of 8 (GroupNorm, 8 groups).")
        if not isinstance(center_crop, bool):
            raise ConfigError(f"PixelBackbone `center_crop` must be a bool, got {center_crop!r}.")
        self.hidden_dim, self.image_size, self.channels, self.width = hidden_dim, image_size, channels, width
        self.word_buckets, self.proprio_dim, self.center_crop, self.seed = word_buckets, proprio_dim, center_crop, seed
        self.cameras = IMAGE_KEYS
        self.observation_spec = ObservationSpec(images=IMAGE_KEYS, image_size=IMAGE_SIZE, proprio_dim=proprio_dim)
        # input standardization, fitted on training data (fit_input_stats) and saved with the weights
        self.register_buffer("pixel_mean", torch.full((3,), 127.5))
        self.register_buffer("pixel_std", torch.full((3,), 127.5))
        self.register_buffer("state_mean", torch.zeros(proprio_dim))
        self.register_buffer("state_std", torch.ones(proprio_dim))
        widths = [channels * m for m in _STAGES]
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.words = nn.Embedding(word_buckets + 1, width, padding_idx=0)
            self.view = nn.Parameter(torch.zeros(len(IMAGE_KEYS), width))  # view embedding, added to the FiLM input
            nn.init.normal_(self.view, std=0.02)  # allowed: weight initialisation under the seeded, forked RNG above
            self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, 2, 1, bias=False), nn.GroupNorm(8, channels),
                                      nn.GELU())
            self.stages = nn.ModuleList(_ResBlock(c_in, c_out, s, 8) for c_in, c_out, s in
                                        zip([channels, *widths[:-1]], widths, _STRIDES))
            self.film = nn.Linear(width, 2 * sum(widths))  # gamma and beta of every stage
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
            self.pool = nn.Linear(3 * widths[-1], width)
            self.proprio = nn.Sequential(nn.Linear(proprio_dim, width), nn.GELU(), nn.Linear(width, width))
            fused = width * (len(IMAGE_KEYS) + 2)
            self.fuse = nn.Sequential(nn.LayerNorm(fused), nn.Linear(fused, hidden_dim), nn.GELU(),
                                      nn.Linear(hidden_dim, hidden_dim))
        self._widths = widths

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fit_input_stats(self, state: np.ndarray, images: np.ndarray) -> None:
        """Standardization buffers from training arrays: ``state`` float [N, P]; ``images`` uint8 [M, ..., 3] (any
        subset of the training images: per-channel mean and std). A constant feature keeps std 1."""
        if images.dtype != np.uint8 or images.shape[-1] != 3:
            raise DTypeError(f"fit_input_stats wants uint8 [..., 3] images, got {images.dtype} {list(images.shape)}.")
        pixels = images.reshape(-1, 3).astype(np.float64)
        for mean_buf, std_buf, x in ((self.state_mean, self.state_std, np.asarray(state, np.float64)),
                                     (self.pixel_mean, self.pixel_std, pixels)):
            mean, std = np.mean(x, axis=0), np.std(x, axis=0)
            mean_buf.copy_(torch.as_tensor(mean, dtype=torch.float32))
            std_buf.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))

    def _encode_views(self, images: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """float32 [N, 3, S, S] in [0, 255] + FiLM input [N, W] -> [N, W]."""
        x = (images - rearrange(self.pixel_mean, "c -> 1 c 1 1")) / rearrange(self.pixel_std, "c -> 1 c 1 1")
        x = self.stem(x)
        films = torch.split(self.film(cond), [w for w in self._widths for _ in (0, 1)], dim=-1)
        for s, stage in enumerate(self.stages):
            gamma, beta = films[2 * s], films[2 * s + 1]  # [N, C_s] each
            x = stage(x) * (1.0 + rearrange(gamma, "n c -> n c 1 1")) + rearrange(beta, "n c -> n c 1 1")
        return self.pool(_spatial_softmax(x))

    def view_features(self, x: PixelInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs -> (each view's FiLM-conditioned image features [B, V, W], the instruction embedding [B, W]).
        ``x.crops`` (training) only for a ``center_crop`` backbone; None gives the evaluation crop."""
        if x.crops is not None and not self.center_crop:
            raise ConfigError("crop boxes were given to a PixelBackbone(center_crop=False): it is trained and "
                              "evaluated uncropped; build the training data without crop augmentation.")
        B, V, S = x.images.shape[0], x.images.shape[1], x.images.shape[2]
        if V != len(self.cameras) or S != self.image_size:
            raise ShapeError(f"pixel inputs hold {V} views of {S} px; this PixelBackbone reads {len(self.cameras)} "
                             f"views of image_size={self.image_size} px (build the arrays with its image_size).")
        x = x.to(self.device)
        flat = rearrange(x.images, "b v h w c -> (b v) h w c")
        instr = mean_embedding(self.words, x.instruction_ids)  # [B, W]
        cond = rearrange(instr, "b w -> b 1 w") + rearrange(self.view, "v w -> 1 v w")  # [B, V, W]
        pixels = (crop_and_resize(flat, views_boxes(x.crops, B, V, CROP_AREA)) if self.center_crop
                  else rearrange(flat.float(), "n h w c -> n c h w"))  # [(B V), 3, S, S]
        views = self._encode_views(pixels, rearrange(cond, "b v w -> (b v) w"))
        return rearrange(views, "(b v) w -> b v w", b=B), instr

    def forward_inputs(self, x: PixelInputs) -> torch.Tensor:
        """Model inputs -> hidden float32 [B, D] (unchecked); see :meth:`view_features` for the crops."""
        views, instr = self.view_features(x)
        proprio = self.proprio((x.state.to(self.device) - self.state_mean) / self.state_std)  # [B, W]
        fused = torch.cat([rearrange(views, "b v w -> b (v w)"), instr, proprio], dim=-1)  # [B, (V + 2) W]
        return self.fuse(fused).float()

    def encode(self, observation: dict, instruction: str | list[str], *, check: bool = True) -> torch.Tensor:
        """observation (``full_image``, ``wrist_image`` uint8 [224, 224, 3], ``state``; unbatched or batched) +
        instruction(s) -> hidden float32 [B, D]. ShapeError / DTypeError / NonFiniteError naming the key; with
        ``check``, DeadHiddenStateError through ``check_hidden``."""
        inputs = pixel_inputs(observation, instruction, self.observation_spec, self.image_size, self.word_buckets)
        hidden = self.forward_inputs(inputs)
        return check_hidden(hidden, self.hidden_dim) if check else hidden

    def forward(self, observation: dict, instruction: str | list[str], *, check: bool = True) -> torch.Tensor:
        return self.encode(observation, instruction, check=check)

    # save / load (see rsd.backbones.base)

    def spec_kwargs(self) -> dict[str, Any]:
        return dict(hidden_dim=self.hidden_dim, image_size=self.image_size, channels=self.channels, width=self.width,
                    word_buckets=self.word_buckets, proprio_dim=self.proprio_dim, center_crop=self.center_crop,
                    seed=self.seed)

