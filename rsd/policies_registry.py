"""Policy names -> policies: the one place the simulator resolves what ``--policy`` means.

``make_policy(spec, suite=...)`` resolves

- ``expert``                 the scripted privileged expert (``rsd.sim.experts.ScriptedExpert``);
- ``expert-rfsq``            the expert with every chunk sent through the RFSQ tokenizer and back
                             (:class:`RFSQRoundTripPolicy`) with the packaged tokenizer ``rsd/assets/tokenizer_libero``;
  ``expert-rfsq:DIR``        the same with the tokenizer (and its ``action_stats.json``) in ``DIR``;
- ``openvla-oft:PATH``       OpenVLA-OFT's own pipeline (its L1 head, its statistics:
                             ``rsd.backbones.openvla.OFTL1Policy``) from the local checkpoint directory ``PATH``,
                             loaded for ``suite`` (what ``rsd eval --suite`` passes); a checkpoint not fine-tuned
                             for that suite raises :class:`WrongBaseModelError`;
  ``openvla-oft:PATH@KEY``   the same with the statistics ``dataset_statistics.json[KEY]`` named explicitly, which
                             turns that suite guard off (a ``libero_spatial`` checkpoint on ``libero_object`` on
                             purpose: ``@libero_spatial_no_noops``); being part of the spec, the key is recorded in
                             ``run.json`` and checked by ``--resume``;
- a directory                a learned policy saved by ``RSDPolicy`` / ``L1Policy`` (``rsd.policy.load_policy``).

Anything else raises :class:`ConfigError` listing the names. Model code is imported only when the spec
needs it, so the simulator never depends on model internals.

``policy_identity(spec)`` says what stands behind a spec, for ``rsd eval``'s ``run.json``: its kind, the
statistics key of ``openvla-oft:PATH@KEY``, and a content hash (``rsd.fingerprint``) of the files it loads, so
that ``--resume`` compares policies by content, never by how their path was written. ``trust_remote_code``
(``rsd eval/collect --trust-remote-code``) is the only way a saved policy's backbone may run a checkpoint's own
Python code (``rsd.policy.load_policy``).

``fast=True`` (``rsd eval --fast``) runs a learned policy on rsd's CUDA fast path:

- a backbone with a fast path (``set_fast``: ``OpenVLAOFTBackbone``, ``OpenVLAShapedBackbone``) gets
  ``set_fast(True, compile=True)``: its optimized model, inductor-compiled, replayed through CUDA graphs
  (the first chunk of each prompt length pays the compile and the capture);
- an RSD policy that decodes greedily is built with ``graphed=True, compile_heads=True``: heads + argmax +
  layout + detokenize as one compiled CUDA graph, whose codes are eager's argmax up to float-rounding ties
  (``rsd.fastpath.argmax_regret``);
- an RSD policy saved with speculative decoding keeps its speculative decoder (the graphed decoder is
  greedy, and ``--fast`` never changes how a policy decodes): only its backbone gets faster, which is said on
  stderr (each chunk's ``info`` also carries ``speculative: True, graphed: False``).

``--fast`` never passes silently: a scripted policy (``expert``, ``expert-rfsq``), a device that is not CUDA,
or a learned policy with nothing on a fast path (e.g. a speculative RSD policy or an L1 policy on a backbone
without ``set_fast``, like ``TinyBackbone`` / ``HFBackbone``) raises :class:`ConfigError` saying what to change.
Actions stay those of the eager policy within the tolerance of each part (bf16 rounding for a compiled
backbone, argmax ties for the compiled heads); timings change, which is why ``rsd eval`` records ``fast``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rsd.errors import (ActionGenerationError, CheckpointMismatchError, CheckpointNotFoundError, ConfigError,
                        ShapeError, WrongBaseModelError)

__all__ = ["POLICY_NAMES", "DEFAULT_TOKENIZER_DIR", "make_policy", "check_fast", "check_device", "policy_identity",
           "policy_device", "RFSQRoundTripPolicy"]

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer_libero"
_SIM_DIR = Path(__file__).resolve().parent / "sim"
_EXPERT_SOURCES = ("experts.py", "task_plans.py")  # the scripted expert is its code: state machine + task table
_LIBERO_ACTION_DIM = 7  # LIBERO's env actions: [dx, dy, dz, droll, dpitch, dyaw, gripper]
POLICY_NAMES: dict[str, str] = {
    "expert": "scripted privileged expert (reads object poses from the raw LIBERO obs)",
    "expert-rfsq": "the expert's chunks round-tripped through the RFSQ tokenizer (expert-rfsq:DIR for another one)",
    "openvla-oft:PATH": "OpenVLA-OFT's L1 pipeline from a local checkpoint dir fine-tuned for --suite "
                        "(openvla-oft:PATH@UNNORM_KEY to run it on another suite on purpose)",
    "<dir>": "a directory saved by RSDPolicy/L1Policy.save_pretrained",
}


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
        from rsd.action_space import ActionSpace
        from rsd.tokenizer import RFSQTokenizer

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
        import torch

        from rsd.policy import ActionChunk

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


def _expert() -> Any:
    from rsd.sim.experts import ScriptedExpert

    return ScriptedExpert()


def _default_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _is_scripted(spec: str) -> bool:
    return spec == "expert" or spec == "expert-rfsq" or spec.startswith("expert-rfsq:")


def check_device(device: str | None) -> None:
    """ConfigError, before anything loads, for a ``--device`` torch cannot parse or cannot use here (a CUDA
    device on a machine where torch sees no CUDA, or a CUDA index that does not exist). None (the default) is
    always fine."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"--device {device!r} is not a torch device: pass e.g. cpu, cuda or cuda:1.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: torch sees no CUDA device on this machine: run on a GPU machine, "
                              f"or pass --device cpu (or leave --device out).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0.")


def policy_device(spec: str, device: str | None) -> str | None:
    """The device a policy spec runs on (what ``make_policy`` resolves; None for scripted policies, which run
    no network): ``device``, or cuda when torch sees one, else cpu."""
    if _is_scripted(spec):
        return None
    import torch

    return str(torch.device(_default_device(device)))


def _split_oft(body: str) -> tuple[str, str | None]:
    """``PATH`` or ``PATH@UNNORM_KEY`` (the text after ``openvla-oft:``) -> (path, key or None)."""
    path, at, key = body.rpartition("@")
    if not at or not key or "/" in key or Path(body).is_dir():  # a directory whose name holds an '@' is a path
        return body, None
    return path, key


def _checkpoint_file(relative: Path) -> bool:
    """What a checkpoint folder's hash covers: every file but hidden ones (``hf download``'s ``.cache/``,
    ``.gitattributes``) and documentation (``*.md``)."""
    return not any(part.startswith(".") for part in relative.parts) and relative.suffix != ".md"


def _hf_checkpoint_of(directory: Path) -> Path | None:
    """The local checkpoint folder a saved policy's backbone references (``HFBackbone``'s ``path_or_id``)."""
    import json

    try:
        meta = json.loads((directory / "policy.json").read_text())
        ref = meta["backbone"]["kwargs"]["path_or_id"]
    except (OSError, ValueError, KeyError, TypeError):  # not that layout: the load says what is wrong
        return None
    return Path(ref) if isinstance(ref, str) and Path(ref).is_dir() else None


def policy_identity(spec: str) -> dict[str, Any]:
    """What stands behind ``spec`` (see the module docstring): ``{"kind", "unnorm_key", "content"}`` where
    ``content`` hashes the files the policy loads (``rsd.fingerprint``):

    - ``expert``: the scripted expert's source; ``expert-rfsq[:DIR]``: that and the tokenizer directory (the
      packaged one by default), every file;
    - ``openvla-oft:PATH[@KEY]``: every file of the checkpoint folder but hidden ones and ``*.md`` (the
      safetensors shards included, read in full), and ``KEY``;
    - a saved policy directory: every file below it, and the local checkpoint folder its backbone references.

    The same files reached by a relative or an absolute path give the same identity. ConfigError for an unknown
    spec, CheckpointNotFoundError for a folder that does not exist."""
    from rsd.fingerprint import hash_file_list, hash_tree

    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"policy spec must be a non-empty string, got {spec!r}.")
    expert = hash_file_list(_SIM_DIR, [Path(name) for name in _EXPERT_SOURCES])
    if spec == "expert":
        return {"kind": "expert", "unnorm_key": None, "content": expert}
    if spec == "expert-rfsq" or spec.startswith("expert-rfsq:"):
        directory = Path(spec.split(":", 1)[1]).expanduser() if ":" in spec else DEFAULT_TOKENIZER_DIR
        if not directory.is_dir():
            raise CheckpointNotFoundError(f"tokenizer directory {directory} of --policy {spec} does not exist.")
        return {"kind": "expert-rfsq", "unnorm_key": None, "content": f"{expert} {hash_tree(directory)}"}
    if spec == "openvla-oft" or spec.startswith("openvla-oft:"):
        path, key = _split_oft(spec.removeprefix("openvla-oft").removeprefix(":"))
        directory = Path(path).expanduser()
        if not path or not directory.is_dir():
            raise CheckpointNotFoundError(f"OpenVLA-OFT checkpoint directory {directory} of --policy {spec} does "
                                          f"not exist.")
        return {"kind": "openvla-oft", "unnorm_key": key, "content": hash_tree(directory, keep=_checkpoint_file)}
    path = Path(spec).expanduser()
    if path.is_dir():
        content = hash_tree(path)
        checkpoint = _hf_checkpoint_of(path)
        if checkpoint is not None:
            content += " backbone " + hash_tree(checkpoint, keep=_checkpoint_file)
        return {"kind": "saved", "unnorm_key": None, "content": content}
    raise _unknown_policy(spec)


def _unknown_policy(spec: str) -> ConfigError:
    listed = "; ".join(f"{name}: {what}" for name, what in POLICY_NAMES.items())
    return ConfigError(f"unknown policy {spec!r} (not a name, and no directory of that name exists). Known: {listed}.")


def check_fast(spec: str, device: str | None) -> None:
    """Raise :class:`ConfigError` when ``fast=True`` cannot apply to ``spec`` on ``device``, without loading it:
    a scripted policy (nothing to speed up), an explicit ``device`` that is not CUDA, the default device
    (None) on a machine where torch sees no CUDA, or a saved policy directory with nothing on a fast path
    (``rsd.policy.fast_plan`` reads its ``policy.json``)."""
    if _is_scripted(spec):
        raise ConfigError(f"--fast speeds up learned policies (their backbone and RSD heads on CUDA); {spec!r} is a "
                          f"scripted policy with no network to speed up: drop --fast.")
    if device is None:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--fast runs the policy through CUDA graphs, and torch sees no CUDA device (the default "
                              "--device is cpu here): run on a GPU machine, or drop --fast.")
    elif device.split(":", 1)[0] != "cuda":
        raise ConfigError(f"--fast runs the policy through CUDA graphs and needs a CUDA device, got --device "
                          f"{device}: pass --device cuda (on a GPU machine) or drop --fast.")
    if Path(spec).is_dir():
        from rsd.policy import fast_plan

        fast_plan(spec)


def _announce_fast(policy: Any) -> None:
    """One stderr line saying what ``fast=True`` put on the fast path (and what it kept), per process."""
    from rsd.policy import RSDPolicy

    backbone = getattr(policy, "backbone", None)
    parts = []
    if getattr(backbone, "fast", False):
        parts.append(f"backbone {type(backbone).__name__}: compiled, CUDA graphs")
    if isinstance(policy, RSDPolicy):
        parts.append("RSD decoder: speculative, kept as saved (the graphed decoder is greedy-only); only the "
                     "backbone is faster" if policy.speculative else
                     "RSD heads + argmax + detokenize: one compiled CUDA graph")
    print(f"rsd: --fast: {type(policy).__name__}: {'; '.join(parts)}", file=sys.stderr)


def _openvla_oft(body: str, suite: str | None, device: str | None) -> Any:
    """``PATH`` or ``PATH@UNNORM_KEY`` (the text after ``openvla-oft:``) -> ``OFTL1Policy`` for ``suite``."""
    path, key = _split_oft(body)
    if not path:
        raise ConfigError("openvla-oft needs a checkpoint directory: --policy openvla-oft:PATH.")
    if suite is None:
        raise ConfigError(f"policy {'openvla-oft:' + body!r} is loaded for one LIBERO suite: pass suite= "
                          f"(rsd eval and rsd collect pass their --suite).")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointNotFoundError(
            f"OpenVLA-OFT checkpoint directory {directory} does not exist. Download the checkpoint for {suite} "
            f"first, e.g. `hf download moojink/openvla-7b-oft-finetuned-{suite.replace('_', '-')} "
            f"--local-dir {directory}`, and pass that directory (rsd eval never downloads).")
    from rsd.backbones.openvla import OFTL1Policy, OpenVLAOFTBackbone

    try:
        backbone = OpenVLAOFTBackbone.from_pretrained(directory, suite, unnorm_key=key,
                                                      allow_suite_mismatch=key is not None,
                                                      device=_default_device(device), local_files_only=True)
    except WrongBaseModelError as exc:
        raise WrongBaseModelError(
            f"{exc} From the command line: --policy openvla-oft:{path}@UNNORM_KEY names the statistics to use "
            f"and runs it on {suite} anyway.") from exc
    return OFTL1Policy(backbone)


def make_policy(spec: str, *, suite: str | None = None, device: str | None = None, fast: bool = False,
                trust_remote_code: bool = False) -> Any:
    """Resolve a ``--policy`` value to a Policy (see the module docstring).

    ``suite`` is the LIBERO suite the policy will run on (needed by ``openvla-oft:``; the others ignore it).
    ``device`` applies to learned policies (default: ``cuda`` when available, else ``cpu``).
    ``fast``: the CUDA fast path (module docstring); ConfigError where it cannot apply.
    ``trust_remote_code``: a saved policy whose backbone asks to run its checkpoint's own code loads only with
    True (``rsd.policy.load_policy``); otherwise it raises RemoteCodeNotAllowedError.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"policy spec must be a non-empty string, got {spec!r}.")
    if fast:
        check_fast(spec, device)
        device = device or "cuda"
    if spec == "expert":
        return _expert()
    if spec == "expert-rfsq" or spec.startswith("expert-rfsq:"):
        directory = Path(spec.split(":", 1)[1]) if ":" in spec else DEFAULT_TOKENIZER_DIR
        return RFSQRoundTripPolicy.from_dir(_expert(), directory)
    if spec == "openvla-oft" or spec.startswith("openvla-oft:"):
        policy = _openvla_oft(spec.removeprefix("openvla-oft").removeprefix(":"), suite, device)
        if fast:
            policy.backbone.set_fast(True, compile=True)
            _announce_fast(policy)
        return policy
    path = Path(spec)
    if path.is_dir():
        from rsd.policy import load_policy

        policy = load_policy(path, device=_default_device(device), fast=fast, trust_remote_code=trust_remote_code)
        if fast:
            _announce_fast(policy)
        return policy
    raise _unknown_policy(spec)
