"""What stands behind a ``--policy`` spec, without loading it: ``policy_identity(spec)``.

``rsd eval`` records it in ``run.json`` and ``--resume`` compares it, so a resumed run never mixes two
policies: ``{"kind", "unnorm_key", "content"}`` where ``content`` hashes the files the policy loads
(``rsd.fingerprint``), never how their path was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsd.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError
from rsd.policy.packaged import resolve_packaged
from rsd.policy.roundtrip import DEFAULT_TOKENIZER_DIR

__all__ = ["POLICY_NAMES", "policy_identity", "expert_sources", "model_center_crop", "split_oft", "is_scripted",
           "unknown_policy"]

_SIM_DIR = Path(__file__).resolve().parents[1] / "sim"
POLICY_NAMES: dict[str, str] = {
    "expert": "scripted privileged expert (reads object poses from the raw LIBERO obs)",
    "expert-rfsq": "the expert's chunks round-tripped through the RFSQ tokenizer (expert-rfsq:DIR for another one)",
    "openvla-oft:PATH": "OpenVLA-OFT's L1 pipeline from a local checkpoint dir fine-tuned for --suite "
                        "(openvla-oft:PATH@UNNORM_KEY runs it with another dataset's statistics on purpose: the "
                        "suite guard is off)",
    "lowdim": "the packaged low-dimensional RSD policy (the default of rsd eval)",
    "lowdim-l1": "its L1 sibling",
    "<dir>": "a directory saved by RSDPolicy/L1Policy.save_pretrained",
}


def is_scripted(spec: str) -> bool:
    """``expert`` and ``expert-rfsq[:DIR]``: policies with no network (nothing for a device or --fast)."""
    return spec == "expert" or spec == "expert-rfsq" or spec.startswith("expert-rfsq:")


def split_oft(body: str) -> tuple[str, str | None]:
    """``PATH`` or ``PATH@UNNORM_KEY`` (the text after ``openvla-oft:``) -> (path, key or None)."""
    path, at, key = body.rpartition("@")
    if not at or not key or "/" in key or Path(body).is_dir():  # a directory whose name holds an '@' is a path
        return body, None
    return path, key


def _checkpoint_file(relative: Path) -> bool:
    """What a checkpoint folder's hash covers: every file but hidden ones (``hf download``'s ``.cache/``,
    ``.gitattributes``) and documentation (``*.md``)."""
    return not any(part.startswith(".") for part in relative.parts) and relative.suffix != ".md"


def _saved_backbone_spec(directory: Path) -> dict[str, Any] | None:
    """The ``backbone`` entry of a saved policy's ``policy.json``, read by the one strict reader (a missing,
    invalid or incomplete ``policy.json`` is a typed error naming it, here as at load time); None for a
    directory that is not a path (a scripted spec)."""
    if not directory.is_dir():
        return None
    from rsd.policy.learned import read_policy_meta

    spec = read_policy_meta(directory)["backbone"]
    if not isinstance(spec, dict):
        raise CheckpointMismatchError(f"{directory / 'policy.json'}: 'backbone' must be an object (the spec "
                                      f"save_pretrained writes), got {type(spec).__name__}.")
    return spec


def _hf_checkpoint_of(directory: Path) -> Path | None:
    """The local checkpoint folder a saved policy's backbone references (``HFBackbone``'s ``path_or_id``)."""
    ref = ((_saved_backbone_spec(directory) or {}).get("kwargs") or {}).get("path_or_id")
    return Path(ref) if isinstance(ref, str) and Path(ref).is_dir() else None


def reads_images(spec: str) -> bool:
    """Whether the policy behind ``spec`` looks at camera images: False for a saved policy whose backbone class says
    ``reads_images = False`` (the low-dimensional one); True otherwise (every image policy, and the scripted ones,
    whose runs keep rendering by default)."""
    backbone = _saved_backbone_spec(Path(spec))
    if backbone is None:
        return True
    import rsd.backbones  # noqa: F401  (registers every backbone)
    from rsd.backbones.base import backbone_class

    return bool(getattr(backbone_class(str(backbone.get("name"))), "reads_images", True))


_CROPPING_BACKBONES = ("openvla-oft", "pixel")  # backbones whose kwargs say whether they centre-crop their views


def model_center_crop(spec: str, center_crop: bool = True) -> bool | None:
    """Whether the model behind ``spec`` sees a 0.9-area centre crop of the observation's OpenVLA-OFT images
    (``rsd.images``; ``rsd.backbones.pixel_views`` for the pixel backbone): the ``center_crop`` switch for
    ``openvla-oft:PATH``, what a saved policy's ``policy.json`` says for an OpenVLA-OFT or pixel backbone (cropping
    unless it says otherwise), None for a policy that sees no OFT pixels.
    ConfigError when ``center_crop=False`` is asked of a policy it cannot apply to."""
    if spec == "openvla-oft" or spec.startswith("openvla-oft:"):
        return bool(center_crop)
    saved = _saved_backbone_spec(Path(spec).expanduser()) if not is_scripted(spec) else None
    if saved is not None and saved.get("name") in _CROPPING_BACKBONES:
        if not center_crop:
            raise ConfigError(f"{spec} is a saved policy: its {saved.get('name')} backbone's crop setting is part of "
                              f"its policy.json (backbone kwargs center_crop, fixed when it was trained), not of "
                              f"--no-center-crop.")
        return bool(saved.get("kwargs", {}).get("center_crop", True))
    if not center_crop:
        raise ConfigError(f"--no-center-crop switches off OpenVLA-OFT's centre crop of openvla-oft:PATH policies; "
                          f"{spec!r} does not see OpenVLA-OFT images.")
    return None


def policy_identity(spec: str, *, center_crop: bool = True) -> dict[str, Any]:
    """What stands behind ``spec`` (see the module docstring): ``{"kind", "unnorm_key", "content",
    "center_crop"}`` where ``center_crop`` is :func:`model_center_crop` and ``content`` hashes the files the
    policy loads (``rsd.fingerprint``):

    - ``expert``: the scripted expert's source (:func:`expert_sources`); ``expert-rfsq[:DIR]``: that and the
      tokenizer directory (the packaged one by default), every file;
    - ``openvla-oft:PATH[@KEY]``: every file of the checkpoint folder but hidden ones and ``*.md`` (the
      safetensors shards included, read in full), and ``KEY``;
    - a saved policy directory: every file below it, and the local checkpoint folder its backbone references.

    The same files reached by a relative or an absolute path give the same identity. ConfigError for an unknown
    spec, CheckpointNotFoundError for a folder that does not exist."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"policy spec must be a non-empty string, got {spec!r}.")
    spec = resolve_packaged(spec)
    return {**_identity(spec), "center_crop": model_center_crop(spec, center_crop)}


def expert_sources(sim_dir: Path | None = None) -> list[Path]:
    """The files the scripted expert is made of (``rsd.sim.experts`` is its code): ``experts.py`` and every
    ``rsd.sim`` module it imports, directly or through another of them (its task table, its controller, ...),
    relative to ``sim_dir`` and sorted. Read from the imports, so a module the expert starts to use is hashed
    without anyone listing it. ``sim_dir``: the folder of ``rsd.sim`` (default: this package's)."""
    import ast

    sim_dir = _SIM_DIR if sim_dir is None else Path(sim_dir)
    found: set[str] = set()
    todo = ["experts"]
    while todo:
        name = todo.pop()
        path = sim_dir / f"{name}.py"
        if name in found or not path.is_file():
            continue
        found.add(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1:  # from . import x / from .x import y, inside rsd.sim
                    module = "rsd.sim" + (f".{module}" if module else "")
                if module == "rsd.sim":
                    todo += [alias.name for alias in node.names]
                elif module.startswith("rsd.sim."):
                    todo.append(module.split(".")[2])
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".")[2] for a in node.names if a.name.startswith("rsd.sim.")]
    return sorted(Path(f"{name}.py") for name in found)


def _identity(spec: str) -> dict[str, Any]:
    from rsd.fingerprint import hash_file_list, hash_tree

    expert = hash_file_list(_SIM_DIR, expert_sources(_SIM_DIR))
    if spec == "expert":
        return {"kind": "expert", "unnorm_key": None, "content": expert}
    if spec == "expert-rfsq" or spec.startswith("expert-rfsq:"):
        directory = Path(spec.split(":", 1)[1]).expanduser() if ":" in spec else DEFAULT_TOKENIZER_DIR
        if not directory.is_dir():
            raise CheckpointNotFoundError(f"tokenizer directory {directory} of --policy {spec} does not exist.")
        return {"kind": "expert-rfsq", "unnorm_key": None, "content": f"{expert} {hash_tree(directory)}"}
    if spec == "openvla-oft" or spec.startswith("openvla-oft:"):
        path, key = split_oft(spec.removeprefix("openvla-oft").removeprefix(":"))
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
    raise unknown_policy(spec)


def unknown_policy(spec: str) -> ConfigError:
    listed = "; ".join(f"{name}: {what}" for name, what in POLICY_NAMES.items())
    return ConfigError(f"unknown policy {spec!r} (not a name, and no directory of that name exists). Known: {listed}.")
