"""``--policy`` strings -> policies, and the one ``--fast`` plan: the place rsd resolves what a policy name means.

``make_policy(spec, suite=...)`` resolves

- ``expert``                 the scripted privileged expert (``rsd.sim.experts.ScriptedExpert``);
- ``expert-rfsq``            the expert with every chunk sent through the RFSQ tokenizer and back
                             (:class:`RFSQRoundTripPolicy`) with the packaged tokenizer ``rsd/assets/tokenizer_libero``;
  ``expert-rfsq:DIR``        the same with the tokenizer (and its ``action_stats.json``) in ``DIR``;
- ``openvla-oft:PATH``       OpenVLA-OFT's own pipeline (its L1 head, its statistics:
                             ``rsd.policy.oft.OFTL1Policy``) from the local checkpoint directory ``PATH``,
                             loaded for ``suite`` (what ``rsd eval --suite`` passes); a checkpoint not fine-tuned
                             for that suite raises :class:`WrongBaseModelError`;
  ``openvla-oft:PATH@KEY``   the same with the statistics ``dataset_statistics.json[KEY]`` named explicitly; a key
                             of another dataset than the suite turns the guard rails off (a ``libero_spatial``
                             checkpoint on ``libero_object`` on purpose: ``@libero_spatial_no_noops``), the suite's
                             own key keeps them on; being part of the spec, the key is recorded in ``run.json`` and
                             checked by ``--resume``;
- a directory                a learned policy saved by ``RSDPolicy`` / ``L1Policy`` (:func:`load_policy`).

Anything else raises :class:`ConfigError` listing the names. Model code is imported only when the spec
needs it.

``rsd.policy.identity.policy_identity(spec)`` says what stands behind a spec, for ``rsd eval``'s ``run.json``: its kind, the
statistics key of ``openvla-oft:PATH@KEY``, and a content hash (``rsd.fingerprint``) of the files it loads, so
that ``--resume`` compares policies by content, never by how their path was written. ``trust_remote_code``
(``rsd eval/collect --trust-remote-code``) is the only way a saved policy's backbone may run a checkpoint's own
Python code (:func:`load_policy`).

``fast=True`` (``rsd eval --fast``) runs a learned policy on rsd's CUDA fast path:

- a backbone with a fast path (``set_fast``: ``OpenVLAOFTBackbone``, ``OpenVLAShapedBackbone``) gets
  ``set_fast(True, compile=True)``: its optimized model, inductor-compiled, replayed through CUDA graphs
  (the first chunk of each prompt length pays the compile and the capture);
- an RSD policy that decodes greedily is built with ``graphed=True, compile_heads=True``: heads + argmax +
  layout + detokenize as one compiled CUDA graph, whose codes are eager's argmax up to float-rounding ties
  (``rsd.fastpath.argmax_regret``);
- an RSD policy saved with speculative decoding (or asked to decode speculatively by ``--decode``) keeps its
  speculative decoder (the graphed decoder is greedy, and ``--fast`` never changes how a policy decodes): only its
  backbone gets faster, which is said on stderr (each chunk's ``info`` also carries ``speculative: True,
  graphed: False``); ``--decode greedy`` on a speculative policy puts its heads on the graph.

``decode`` / ``threshold`` / ``check_greedy`` (``rsd eval --decode/--threshold/--check-greedy``) choose how a saved
RSD policy decodes (``rsd.policy.decode.resolve_decode``; ConfigError for any other policy, before it loads).

``--fast`` never passes silently: a scripted policy (``expert``, ``expert-rfsq``), a device that is not CUDA,
or a learned policy with nothing on a fast path (e.g. a speculative RSD policy or an L1 policy on a backbone
without ``set_fast``, like ``TinyBackbone`` / ``HFBackbone``) raises :class:`ConfigError` saying what to change.
Actions stay those of the eager policy within the tolerance of each part (bf16 rounding for a compiled
backbone, argmax ties for the compiled heads); timings change, which is why ``rsd eval`` records ``fast``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from rsd.errors import CheckpointNotFoundError, ConfigError, WrongBaseModelError
from rsd.policy.decode import DecodeChoice, resolve_decode
from rsd.policy.identity import (POLICY_NAMES, is_scripted, model_center_crop, policy_identity, split_oft,
                                 unknown_policy)
from rsd.policy.learned import KINDS, L1Policy, RSDPolicy, read_policy_meta, saved_speculative
from rsd.policy.packaged import resolve_packaged
from rsd.policy.roundtrip import DEFAULT_TOKENIZER_DIR, RFSQRoundTripPolicy

__all__ = ["POLICY_NAMES", "DEFAULT_TOKENIZER_DIR", "make_policy", "load_policy", "fast_plan", "FastPlan",
           "check_fast", "check_device", "policy_identity", "policy_device"]


def _expert() -> Any:
    from rsd.sim.experts import ScriptedExpert

    return ScriptedExpert()


def _default_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


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
    no network): ``device``, or cuda when torch sees one, else cpu. A CUDA device is named with its index
    (``cuda`` and ``cuda:0`` are the same device, and ``run.json`` records them alike)."""
    if is_scripted(spec):
        return None
    dev = torch.device(_default_device(device))
    if dev.type == "cuda" and dev.index is None:  # rsd never calls set_device: plain cuda is device 0 of the
        dev = torch.device("cuda", 0)  # visible ones (CUDA_VISIBLE_DEVICES picks which GPU that is)
    return str(dev)


def check_fast(spec: str, device: str | None, *, speculative: bool | None = None) -> None:
    """Raise :class:`ConfigError` when ``fast=True`` cannot apply to ``spec`` on ``device``, without loading it:
    a scripted policy (nothing to speed up), an explicit ``device`` that is not CUDA, the default device
    (None) on a machine where torch sees no CUDA, or a saved policy directory with nothing on a fast path
    (``rsd.policy.fast_plan`` reads its ``policy.json``; ``speculative`` overrides how it was saved to decode)."""
    if is_scripted(spec):
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
        fast_plan(spec, speculative=speculative)


def _announce_fast(policy: Any) -> None:
    """One stderr line saying what ``fast=True`` put on the fast path (and what it kept), per process."""
    backbone = getattr(policy, "backbone", None)
    parts = []
    if getattr(backbone, "fast", False):
        parts.append(f"backbone {type(backbone).__name__}: compiled, CUDA graphs")
    if isinstance(policy, RSDPolicy):
        parts.append(f"RSD decoder: speculative ({policy.mode}), kept (the graphed decoder is greedy-only); only "
                     f"the backbone is faster" if policy.speculative else
                     "RSD heads + argmax + detokenize: one compiled CUDA graph")
    print(f"rsd: --fast: {type(policy).__name__}: {'; '.join(parts)}", file=sys.stderr)


def _openvla_oft(body: str, suite: str | None, device: str | None, center_crop: bool) -> Any:
    """``PATH`` or ``PATH@UNNORM_KEY`` (the text after ``openvla-oft:``) -> ``OFTL1Policy`` for ``suite``."""
    path, key = split_oft(body)
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
    from rsd.backbones.openvla import OpenVLAOFTBackbone
    from rsd.policy.oft import OFTL1Policy

    # @KEY of another dataset is the deliberate override; naming the suite's own statistics keeps the guard rails
    override = key is not None and key not in (suite, f"{suite}_no_noops")
    try:
        backbone = OpenVLAOFTBackbone.from_pretrained(directory, suite, unnorm_key=key, allow_suite_mismatch=override,
                                                      device=_default_device(device), local_files_only=True,
                                                      center_crop=center_crop)
    except WrongBaseModelError as exc:
        raise WrongBaseModelError(
            f"{exc} From the command line: --policy openvla-oft:{path}@UNNORM_KEY with the statistics key of the "
            f"dataset the checkpoint was fine-tuned on runs it on {suite} anyway (@{suite} or @{suite}_no_noops "
            f"keeps these checks on).") from exc
    return OFTL1Policy(backbone)


def make_policy(spec: str, *, suite: str | None = None, device: str | None = None, fast: bool = False,
                trust_remote_code: bool = False, center_crop: bool = True, decode: str = "saved",
                threshold: float | int | None = None, check_greedy: bool | None = None) -> Any:
    """Resolve a ``--policy`` value to a Policy (see the module docstring).

    ``suite`` is the LIBERO suite the policy will run on (needed by ``openvla-oft:``; the others ignore it).
    ``device`` applies to learned policies (default: ``cuda`` when available, else ``cpu``).
    ``fast``: the CUDA fast path (module docstring); ConfigError where it cannot apply.
    ``trust_remote_code``: a saved policy whose backbone asks to run its checkpoint's own code loads only with
    True (``rsd.policy.load_policy``); otherwise it raises RemoteCodeNotAllowedError.
    ``center_crop``: OpenVLA-OFT's centre crop of both views for ``openvla-oft:PATH`` (OFT's default; False for a
    checkpoint trained without crop augmentation); ConfigError when False for any other policy.
    ``decode``, ``threshold``, ``check_greedy``: how a saved RSD policy decodes (``rsd.policy.decode``); anything but
    the defaults is a ConfigError for any other policy, before it loads.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"policy spec must be a non-empty string, got {spec!r}.")
    spec = resolve_packaged(spec)  # lowdim / lowdim-l1 -> the packaged directory
    model_center_crop(spec, center_crop)  # a switch that cannot apply is refused before anything loads
    choice = resolve_decode(spec, decode, threshold, check_greedy)
    if fast:
        check_fast(spec, device, speculative=choice.speculative)
        device = device or "cuda"
    if spec == "expert":
        return _expert()
    if spec == "expert-rfsq" or spec.startswith("expert-rfsq:"):
        directory = Path(spec.split(":", 1)[1]) if ":" in spec else DEFAULT_TOKENIZER_DIR
        return RFSQRoundTripPolicy.from_dir(_expert(), directory)
    if spec == "openvla-oft" or spec.startswith("openvla-oft:"):
        policy = _openvla_oft(spec.removeprefix("openvla-oft").removeprefix(":"), suite, device, center_crop)
        if fast:
            policy.backbone.set_fast(True, compile=True)
            _announce_fast(policy)
        return policy
    path = Path(spec)
    if path.is_dir():
        policy = load_policy(path, device=_default_device(device), fast=fast, trust_remote_code=trust_remote_code,
                             decode=choice)
        if fast:
            _announce_fast(policy)
        return policy
    raise unknown_policy(spec)


@dataclass(frozen=True)
class FastPlan:
    """What ``fast=True`` does to a saved policy: graph its RSD heads, and/or put its backbone on its fast path."""

    graph_heads: bool
    backbone: bool


def fast_plan(directory: str | Path, *, speculative: bool | None = None) -> FastPlan:
    """Read ``directory/policy.json`` and say what ``load_policy(directory, fast=True)`` will speed up, without
    loading anything. ConfigError for an unknown kind, and for a policy with nothing on a fast path (a
    speculative or L1 policy whose backbone has no ``set_fast``). ``speculative`` (``--decode``; None: as saved)
    overrides how an RSD policy was saved to decode."""
    directory = Path(directory)
    return _fast_plan(read_policy_meta(directory), directory, speculative)


def _fast_plan(meta: Mapping[str, Any], directory: Path, speculative: bool | None = None) -> FastPlan:
    from rsd.backbones.base import backbone_class

    kind = meta["kind"]
    backbone_cls = backbone_class(meta.get("backbone", {}).get("name", ""))
    speculative = saved_speculative(meta) if speculative is None else speculative
    plan = FastPlan(graph_heads=kind == RSDPolicy.kind and not speculative,
                    backbone=hasattr(backbone_cls, "set_fast"))
    if not (plan.graph_heads or plan.backbone):
        what = "decodes speculatively (kept: the graphed decoder is greedy-only)" if kind == RSDPolicy.kind \
            else f"is a {kind!r} policy (its head is not graphed)"
        raise ConfigError(f"fast=True has nothing to speed up in {directory}: the policy {what} and its "
                          f"{backbone_cls.__name__} has no fast path (set_fast). Drop --fast / fast=True.")
    return plan


def load_policy(directory: str | Path, *, device: str | torch.device = "cpu", fast: bool = False,
                trust_remote_code: bool = False, decode: str | DecodeChoice = "saved",
                threshold: float | int | None = None, check_greedy: bool | None = None) -> RSDPolicy | L1Policy:
    """Load any saved learned policy (RSD or L1) from ``directory`` by the kind in its ``policy.json``.

    ``fast`` (CUDA ``device`` only) puts what has one on rsd's fast path (:func:`fast_plan`): a backbone with
    ``set_fast`` gets ``set_fast(True, compile=True)``; an RSD policy that decodes greedily gets
    ``use_graphed_heads(compile=True)`` (one compiled CUDA graph; codes = eager's argmax up to float-rounding
    ties). A speculative RSD policy keeps its speculative decoder (``fast`` never changes the decoding mode).
    ConfigError for a non-CUDA device, and for a policy with nothing on a fast path, before loading.

    ``trust_remote_code`` is the only switch that lets a backbone run its checkpoint's own Python code: a
    ``policy.json`` asking for it raises RemoteCodeNotAllowedError unless it is True.

    ``decode`` (a ``--decode`` mode, or a :class:`DecodeChoice` already resolved), ``threshold`` and ``check_greedy``
    choose how an RSD policy decodes (``rsd.policy.decode.resolve_decode``); ConfigError where they cannot apply.
    """
    directory = Path(directory)
    choice = decode if isinstance(decode, DecodeChoice) else resolve_decode(str(directory), decode, threshold,
                                                                            check_greedy)
    if fast and torch.device(device).type != "cuda":
        raise ConfigError(f"fast=True runs the policy through CUDA graphs and needs a CUDA device, got {device}: "
                          f"load it on cuda or pass fast=False (rsd eval: --device cuda, or drop --fast).")
    meta = read_policy_meta(directory)
    plan = _fast_plan(meta, directory, choice.speculative) if fast else FastPlan(graph_heads=False, backbone=False)
    overrides = choice.overrides() if meta["kind"] == RSDPolicy.kind else {}
    policy = KINDS[meta["kind"]].from_pretrained(directory, device=device, trust_remote_code=trust_remote_code,
                                                 **overrides)
    if plan.graph_heads:
        policy.use_graphed_heads(compile=True)
    if plan.backbone:
        policy.backbone.set_fast(True, compile=True)
    return policy
