"""The tokenizer round trip as a policy: what an RSD policy whose head predicted every code right would execute.

``RFSQRoundTripPolicy(inner, tokenizer, action_space)`` wraps any Policy (``rsd eval --policy expert-rfsq``
wraps the scripted expert) and sends each of its chunks through the RFSQ tokenizer and back before they are
executed. Its success rate is the ceiling the tokenizer allows a perfect RSD head.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from rsd.action_space import ActionSpace
from rsd.errors import ActionGenerationError, CheckpointMismatchError, ShapeError
from rsd.policy.protocol import ActionChunk
from rsd.tokenizer import RFSQTokenizer

__all__ = ["RFSQRoundTripPolicy", "DEFAULT_TOKENIZER_DIR"]

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer_libero"
_LIBERO_ACTION_DIM = 7  # LIBERO's env actions: [dx, dy, dz, droll, dpitch, dyaw, gripper]


class RFSQRoundTripPolicy:
    """Wraps a policy so every chunk it returns is tokenized and detokenized before it is executed.

    ``env actions [C, A] -> ActionSpace.normalize -> RFSQTokenizer.encode -> codes [1, C, H, L]
    -> decode_from_indices -> [1, C, A] -> ActionSpace.to_env`` (clip, un-normalize, gripper binarized), i.e.
    what an RSD policy whose head predicted the expert's codes perfectly would execute. The gripper goes
    through the tokenizer in model convention (``[0, 1]``, 1 = open) like every other dim.
    """

    def __init__(self, inner: Any, tokenizer: Any, action_space: Any) -> None:
        self.inner = inner
        self.tokenizer = tokenizer.eval()
        self.action_space = action_space

    @classmethod
    def from_dir(cls, inner: Any, directory: str | Path = DEFAULT_TOKENIZER_DIR) -> "RFSQRoundTripPolicy":
        tokenizer = RFSQTokenizer.from_pretrained(directory)
        if tokenizer.action_dim != _LIBERO_ACTION_DIM:
            raise CheckpointMismatchError(
                f"the tokenizer in {directory} encodes action_dim {tokenizer.action_dim}, but LIBERO actions have "
                f"action_dim {_LIBERO_ACTION_DIM} (xyz, rpy, gripper): train it on LIBERO demos with "
                f"`rsd train-tokenizer` and pass that directory.")
        return cls(inner, tokenizer, ActionSpace.load(directory))

    def reset(self) -> None:
        self.inner.reset()

    def predict_chunk(self, observation: Mapping[str, Any], instruction: str) -> Any:
        chunk = self.inner.predict_chunk(observation, instruction)
        t0 = time.perf_counter()
        try:
            actions = chunk.actions  # [C, A], env convention
            C, A = self.tokenizer.chunk_len, self.tokenizer.action_dim
            if actions.shape != (C, A):
                raise ShapeError(f"the wrapped policy returned a chunk of shape {actions.shape}, the tokenizer "
                                 f"takes [{C}, {A}]: train the tokenizer with --chunk-len {actions.shape[0]}.")
            norm = torch.from_numpy(self.action_space.normalize(actions))[None]  # [1, C, A]
            with torch.inference_mode():
                codes = self.tokenizer.encode(norm)  # [1, C, H, L]
                recon = self.tokenizer.decode_from_indices(codes)  # [1, C, A]
            recon_np = recon[0].numpy()
            out = self.action_space.to_env(recon_np)
        except Exception as exc:
            raise ActionGenerationError(f"RFSQ round trip of the {type(self.inner).__name__} chunk failed: "
                                        f"{type(exc).__name__}: {exc}") from exc
        info = dict(chunk.info)
        info["rfsq_roundtrip"] = {
            "ms": 1e3 * (time.perf_counter() - t0),
            "normalized_mse": float(np.mean((recon_np - norm[0].numpy()) ** 2)),
            "max_abs_env_error_arm": float(np.max(np.abs(out[:, :-1] - actions[:, :-1]))),
            "gripper_flips": int(np.sum(np.sign(out[:, -1]) != np.sign(actions[:, -1]))),
        }
        return ActionChunk(actions=out, info=info)
