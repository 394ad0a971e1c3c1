"""The `Backbone` contract (observation + instruction -> hidden [B, D]), the backbone registry,
the shared hidden-state check, and the save/load hooks a policy uses for its backbone.

A backbone class joins the registry with ``@register_backbone("name")`` and implements:

    hidden_dim: int
    encode(observation, instruction, *, check=True) -> float32 [B, D]   # check: check_hidden on the result
    spec_kwargs() -> dict                        # JSON-able kwargs that rebuild it (no device)
    save_weights(directory) -> None              # files it needs besides the spec (may write none)
    load_spec(kwargs, directory, device) -> obj  # classmethod: inverse of the two above

Checking the hidden state: ``check_hidden`` reads its values (one host sync). A backbone used standalone
keeps that check (``check=True``, the default); a policy calls ``encode(..., check=False)`` and runs
``check_hidden`` itself, once per chunk, where the hidden state enters the heads (which never re-check it).

The observation dict is the contract in ``rsd.observation`` (docs/design.md): ``FULL_IMAGE`` / ``WRIST_IMAGE`` uint8
[S, S, 3] (or batched [B, S, S, 3]), ``STATE`` float32 [P] (or [B, P]). A backbone states what it reads as an
``ObservationSpec``; :func:`observation_batch` checks the observation against it and hands back batched tensors.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, overload, runtime_checkable

import numpy as np
import torch

from rsd.checkpoint import load_module, save_module
from rsd.errors import ConfigError, DeadHiddenStateError, DTypeError, RemoteCodeNotAllowedError, ShapeError
from rsd.observation import STATE, ObservationSpec

__all__ = [
    "Backbone",
    "register_backbone",
    "registered_backbones",
    "build_backbone",
    "backbone_class",
    "check_hidden",
    "check_hidden_rows",
    "backbone_spec",
    "save_backbone",
    "load_backbone",
    "instructions_for_batch",
    "observation_batch",
    "StateDictWeights",
    "WEIGHTS_FILE",
]

WEIGHTS_FILE = "backbone.safetensors"  # the state dict of a backbone whose files are its weights alone

# main protocol


@runtime_checkable
class Backbone(Protocol):
    """Maps an observation dict and its instruction(s) to one hidden vector per batch element."""

    hidden_dim: int

    def encode(self, observation: dict, instruction: str | list[str], *, check: bool = True) -> torch.Tensor:
        """-> float32 [B, D] with D == hidden_dim; B = 1 for an unbatched observation. ``check``: pass the
        result through :func:`check_hidden` (DeadHiddenStateError on NaN/inf or all-zero rows); ``False``
        returns it unchecked, for a caller that checks it once itself."""
        ...


# registry

_REGISTRY: dict[str, type] = {}
_T = TypeVar("_T", bound=type)


def register_backbone(name: str) -> Callable[[_T], _T]:
    """Class decorator: ``build_backbone(name, **kwargs)`` then constructs ``cls.build(**kwargs)``
    (or ``cls(**kwargs)`` when the class has no ``build``); sets ``cls.backbone_name = name``."""

    def decorate(cls: _T) -> _T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(
                f"Backbone name {name!r} is already registered by {_REGISTRY[name].__qualname__}; "
                f"pick another name for {cls.__qualname__}."
            )
        cls.backbone_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_backbones() -> list[str]:
    """Sorted names that ``build_backbone`` accepts."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> type:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown backbone {name!r}.{hint} Known backbones: {registered_backbones()}.")
    return _REGISTRY[name]


def backbone_class(name: str) -> type:
    """The class registered as ``name`` (what a saved spec will build); ConfigError with the closest match."""
    return _lookup(name)


def build_backbone(name: str, **kwargs: Any) -> Backbone:
    """Construct the backbone registered as ``name``; unknown names raise ConfigError with the closest match."""
    cls = _lookup(name)
    factory = getattr(cls, "build", cls)
    return factory(**kwargs)


# the shared hidden-state check


@overload
def check_hidden(hidden: torch.Tensor, expected_dim: int, *, return_norm: Literal[False] = ...) -> torch.Tensor: ...


@overload
def check_hidden(hidden: torch.Tensor, expected_dim: int, *, return_norm: Literal[True]) -> tuple[torch.Tensor, float]: ...


def check_hidden(hidden: torch.Tensor, expected_dim: int, *, return_norm: bool = False
                 ) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Validate a backbone output ``hidden`` [B, D]; return it unchanged (``return_norm``: ``(hidden, its L2
    norm as a float)``, read in the same host sync as the checks).

    Raises DTypeError (not a floating tensor), ShapeError (not [B, expected_dim] with B >= 1),
    DeadHiddenStateError (non-finite values, or a row that is exactly zero: the
    symptom of a vision encoder that failed to load; docs/failure-modes.md).
    """
    _check_hidden_layout(hidden, expected_dim)
    finite_rows = torch.isfinite(hidden).all(dim=1)  # [B]
    dead = (hidden == 0).all(dim=1)  # [B]
    read = [finite_rows.all().float(), dead.any().float()] + ([hidden.float().norm()] if return_norm else [])
    all_finite, any_dead, *norm = torch.stack(read).tolist()  # one host sync
    if not all_finite:
        bad_rows = (~finite_rows).nonzero().flatten().tolist()
        raise DeadHiddenStateError(
            f"hidden state has NaN/inf in batch rows {bad_rows}; check the backbone weights and the "
            f"autocast dtype (bf16 overflow) before trusting any action."
        )
    if any_dead:
        dead_rows = dead.nonzero().flatten().tolist()
        raise DeadHiddenStateError(
            f"hidden state is all zero in batch rows {dead_rows}: the backbone (vision encoder or its "
            f"weights) is not producing features; check that the checkpoint loaded."
        )
    return (hidden, norm[0]) if return_norm else hidden


def check_hidden_rows(hidden: torch.Tensor, expected_dim: int) -> tuple[list[float], dict[int, DeadHiddenStateError]]:
    """:func:`check_hidden` row by row, in one host sync: (each row's L2 norm, ``{row: the DeadHiddenStateError that
    check_hidden raises for that row alone}``) for the rows of a batch of several episodes. DTypeError / ShapeError
    (the layout) for the whole tensor."""
    _check_hidden_layout(hidden, expected_dim)
    finite = torch.isfinite(hidden).all(dim=1)  # [B]
    dead = (hidden == 0).all(dim=1)  # [B]
    ok, norms = torch.stack([(finite & ~dead).float(), hidden.float().norm(dim=1)]).tolist()  # one host sync
    errors: dict[int, DeadHiddenStateError] = {}
    for row in (i for i, good in enumerate(ok) if not good):
        try:
            check_hidden(hidden[row: row + 1], expected_dim)
        except DeadHiddenStateError as exc:
            errors[row] = exc
    return norms, errors


def _check_hidden_layout(hidden: torch.Tensor, expected_dim: int) -> None:
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        kind = hidden.dtype if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise DTypeError(f"hidden state must be a floating torch.Tensor [B, {expected_dim}], got {kind}.")
    if hidden.ndim != 2 or hidden.shape[0] < 1 or hidden.shape[1] != expected_dim:
        raise ShapeError(
            f"hidden state must have shape [B, {expected_dim}] (B >= 1), got {list(hidden.shape)}; "
            f"check the backbone's hidden_dim against the head config's hidden_dim."
        )


# helpers shared by backbones


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))


def observation_batch(observation: dict, spec: ObservationSpec, *, hint: str = ""
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Check ``observation`` against ``spec`` (:meth:`ObservationSpec.validate`: keys, dtypes, shapes, a finite
    state, one batch size for every key; ShapeError / DTypeError / NonFiniteError naming the key) and return
    (one uint8 ``[B, S, S, 3]`` tensor per ``spec.images`` key, state float32 ``[B, P]``); an unbatched
    observation gives B = 1. ``hint``: what the caller can change when an image is missing."""
    spec.validate(observation, hint=hint)
    images = [_as_tensor(observation[key]) for key in spec.images]
    state = _as_tensor(observation[STATE]).float()
    if state.ndim == 1:
        return [image[None] for image in images], state[None]
    return images, state


def instructions_for_batch(instruction: str | list[str] | tuple[str, ...], batch: int) -> list[str]:
    """One instruction per batch element: a str is repeated ``batch`` times; a list must have ``batch`` items."""
    if isinstance(instruction, str):
        return [instruction] * batch
    if isinstance(instruction, (list, tuple)) and all(isinstance(s, str) for s in instruction):
        if len(instruction) != batch:
            raise ShapeError(
                f"got {len(instruction)} instructions for a batch of {batch} observations; "
                f"pass one str (shared) or exactly {batch}."
            )
        return list(instruction)
    raise ShapeError(f"instruction must be a str or a list of str, got {type(instruction).__name__}.")


# save / load hooks for policies


def _check_spec_kwargs(factory: Callable[..., Any], kwargs: dict[str, Any], what: str,
                       exclude: tuple[str, ...] = ()) -> None:
    """Raise ConfigError when a saved spec has kwargs ``factory`` does not take (or ones load sets itself)."""
    params = inspect.signature(factory).parameters
    accepted = {n for n, p in params.items() if n not in ("self", "cls") and p.kind != p.VAR_KEYWORD} - set(exclude)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"backbone spec kwargs {unknown} do not fit {what}; it takes {sorted(accepted)}.")


def backbone_spec(backbone: Backbone) -> dict[str, Any]:
    """``{"name": ..., "kwargs": {...}}``, JSON-able; ``load_backbone`` rebuilds the backbone from it."""
    name = getattr(type(backbone), "backbone_name", None)
    if name is None or _REGISTRY.get(name) is not type(backbone):
        raise ConfigError(
            f"{type(backbone).__qualname__} is not a registered backbone; decorate it with "
            f"@register_backbone(name) so policies can save it. Known backbones: {registered_backbones()}."
        )
    return {"name": name, "kwargs": backbone.spec_kwargs()}


def save_backbone(backbone: Backbone, directory: str | Path) -> dict[str, Any]:
    """Write the backbone's files (e.g. ``backbone.safetensors``) into ``directory``; return its spec."""
    spec = backbone_spec(backbone)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backbone.save_weights(directory)
    return spec


def load_backbone(spec: dict[str, Any], directory: str | Path, *, device: str | torch.device = "cpu",
                  trust_remote_code: bool = False) -> Backbone:
    """Inverse of ``save_backbone``: rebuild the backbone named in ``spec`` from the files in ``directory``.

    A spec whose kwargs ask for ``trust_remote_code`` (anything but absent or false) runs a checkpoint's own
    Python code; it loads only when the caller passes ``trust_remote_code=True`` (``rsd eval
    --trust-remote-code``), else RemoteCodeNotAllowedError. The saved file alone never switches it on.
    """
    if not isinstance(spec, dict) or set(spec) != {"name", "kwargs"} or not isinstance(spec["kwargs"], dict):
        raise ConfigError(
            f"backbone spec must be a dict with exactly the keys 'name' and 'kwargs' (a dict), got {spec!r}."
        )
    if spec["kwargs"].get("trust_remote_code", False) is not False and trust_remote_code is not True:
        raise RemoteCodeNotAllowedError(
            f"the backbone spec saved in {directory} asks for trust_remote_code="
            f"{spec['kwargs']['trust_remote_code']!r}: loading it runs the checkpoint's own Python code "
            f"({spec['kwargs'].get('path_or_id', spec['name'])!r}). If you trust that code, pass --trust-remote-code "
            f"(rsd eval / rsd collect) or trust_remote_code=True (load_policy); otherwise do not load this policy."
        )
    cls = _lookup(spec["name"])
    return cls.load_spec(dict(spec["kwargs"]), Path(directory), device=device)


class StateDictWeights:
    """Save/load hooks of a backbone (an ``nn.Module``) whose files are its state dict alone, buffers included:
    ``WEIGHTS_FILE`` in safetensors, loaded strictly (a missing, unexpected or reshaped entry is a
    CheckpointMismatchError; spec kwargs the class does not take are a ConfigError)."""

    def save_weights(self, directory: Path) -> None:
        save_module(self, Path(directory) / WEIGHTS_FILE)  # type: ignore[arg-type]

    @classmethod
    def load_spec(cls, kwargs: dict[str, Any], directory: Path, *, device: str | torch.device = "cpu") -> Any:
        _check_spec_kwargs(cls.__init__, kwargs, cls.__name__)
        model = load_module(cls(**kwargs), Path(directory) / WEIGHTS_FILE, what=f"{cls.__name__} weights",
                            hint=f"Save the policy again (save_backbone writes {WEIGHTS_FILE}).")
        return model.to(device)
