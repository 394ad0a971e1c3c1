"""`HFBackbone`: a Hugging Face vision-language model as a backbone.

The hidden state is the one an RSD head reads from an OpenVLA-class model: run the model with
``output_hidden_states=True`` (bf16 autocast on CUDA) and take the final layer's hidden state
``hidden_states[-1]`` [B, T, D] at the LAST REAL (non-pad) token of each batch element -> float32 [B, D].

Model classes are tried in order: AutoModelForImageTextToText, AutoModelForVision2Seq (transformers 4.x
only), AutoModel; with ``trust_remote_code=True`` a checkpoint's own ``auto_map`` class is used when none
of those knows its config (e.g. OpenVLA's ``AutoModelForVision2Seq`` entry on transformers 5).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from rsd.backbones.base import _check_spec_kwargs, check_hidden, instructions_for_batch, register_backbone
from rsd.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError, DTypeError, ShapeError
from rsd.observation import FULL_IMAGE
from rsd.prompt import PROMPT_TEMPLATE

__all__ = ["HFBackbone", "DEFAULT_PROMPT", "last_real_token_index", "hf_offline_mode"]

DEFAULT_PROMPT = PROMPT_TEMPLATE  # OpenVLA(-OFT) prompt (rsd.prompt)
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_MODEL_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModel")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# helper functions


def hf_offline_mode() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set to 1/true/yes/on (read at call time)."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in _OFFLINE_VARS)


def last_real_token_index(attention_mask: torch.Tensor, sequence_length: int | None = None) -> torch.Tensor:
    """Index of the last real token of each row: attention_mask int/bool [B, T] -> int64 [B].

    Works for left and right padding (it is the last position whose mask is 1). When the model inserts
    tokens of its own (its hidden states are [B, T', D] with T' > T, e.g. Prismatic/OpenVLA splicing image
    patches in after BOS), pass ``sequence_length=T'``: the inserted tokens lie before the last real
    token, so the index shifts by T' - T.
    """
    if attention_mask.ndim != 2:
        raise ShapeError(f"attention_mask must be [B, T], got {list(attention_mask.shape)}.")
    real = attention_mask.bool()
    empty = (~real.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ShapeError(f"attention_mask rows {empty} have no real token; every prompt must be non-empty.")
    length = attention_mask.shape[1]
    last = length - 1 - real.flip(-1).to(torch.int64).argmax(dim=-1)  # [B]
    if sequence_length is not None:
        if sequence_length < length:
            raise ShapeError(f"hidden states have {sequence_length} positions but the attention mask has "
                             f"{length}; the model dropped tokens, so the last real token is unknown.")
        last = last + (sequence_length - length)
    return last


def _looks_like_path(path_or_id: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything absolute, ./, ../, ~ or with more slashes is a path."""
    return (os.path.isabs(path_or_id) or path_or_id.startswith((".", "~")) or "\\" in path_or_id
            or path_or_id.count("/") > 1 or path_or_id.endswith("/"))


def _resolve_source(path_or_id: str | os.PathLike) -> tuple[str, bool]:
    """-> (local absolute dir or hub id, is_local); a missing local path raises CheckpointNotFoundError."""
    text = os.fspath(path_or_id)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointNotFoundError(
                f"{path} exists but is not a Hugging Face model directory (no config.json); pass the "
                f"directory that save_pretrained wrote."
            )
        return str(path.resolve()), True
    if _looks_like_path(text):
        raise CheckpointNotFoundError(f"model directory {path} does not exist; check the path (or pass a hub id).")
    return text, False


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"HFBackbone `dtype` must be one of {sorted(_DTYPES)} (or the torch dtype), got {dtype!r}.")


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in _DTYPES.items() if value == dtype)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers >= 4.56 takes ``dtype=``; older versions ``torch_dtype=``."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def _strict(source: str, model: Any, info: dict[str, Any]) -> Any:
    """Refuse a model whose checkpoint left weights missing (randomly initialised), unexpected or mis-shaped."""
    problems = {key: sorted(map(str, info.get(key) or ())) for key in ("missing_keys", "unexpected_keys",
                                                                        "mismatched_keys")}
    if any(problems.values()):
        raise CheckpointMismatchError(
            f"{source!r} does not match {type(model).__name__}: {problems}. Missing weights would be random; "
            f"use the model class the checkpoint was saved with (or fix the checkpoint)."
        )
    return model


def _load_model(source: str, config: Any, *, trust_remote_code: bool, local_files_only: bool,
                dtype: torch.dtype) -> Any:
    import transformers

    kwargs = dict(config=config, trust_remote_code=trust_remote_code, local_files_only=local_files_only,
                  output_loading_info=True, **_dtype_kwarg(dtype))
    auto_map = getattr(config, "auto_map", None) or {}
    for name in _MODEL_AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        if type(config) in auto._model_mapping or (trust_remote_code and name in auto_map):
            return _strict(source, *auto.from_pretrained(source, **kwargs))
    remote = [key for key in auto_map if key.startswith("AutoModel")]
    if trust_remote_code and remote:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        cls = get_class_from_dynamic_module(auto_map[remote[0]], source, local_files_only=local_files_only)
        return _strict(source, *cls.from_pretrained(source, **kwargs))
    hint = (f" It ships its own code ({remote}); pass trust_remote_code=True if you trust it."
            if remote else "")
    raise ConfigError(
        f"no transformers model class loads {source!r} (config {type(config).__name__}, model_type "
        f"{getattr(config, 'model_type', None)!r}); tried {list(_MODEL_AUTO_CLASSES)}.{hint}"
    )


def _images_for_processor(observation: dict, key: str) -> list[Any]:
    """observation[key] uint8 [H, W, 3] or [B, H, W, 3] -> list of B PIL images."""
    from PIL import Image

    if not isinstance(observation, dict) or key not in observation:
        have = sorted(observation) if isinstance(observation, dict) else type(observation).__name__
        raise ShapeError(f"observation is missing {key!r} (has {have}); HFBackbone needs a rendered image.")
    image = observation[key]
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise DTypeError(f"observation[{key!r}] must be a uint8 array [H, W, 3] or [B, H, W, 3], got {kind}.")
    if image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ShapeError(f"observation[{key!r}] must be [H, W, 3] or [B, H, W, 3] uint8, got {list(image.shape)}.")
    batch = image if image.ndim == 4 else rearrange(image, "h w c -> 1 h w c")
    return [Image.fromarray(np.ascontiguousarray(frame)) for frame in batch]


# main class


@register_backbone("hf")
class HFBackbone:
    """A frozen Hugging Face VLM: ``encode(obs, instr) -> float32 [B, D]``, D = text_config.hidden_size.

    Build with ``HFBackbone.from_pretrained(path_or_id, ...)`` (or ``build_backbone("hf", path_or_id=...)``).
    The prompt is ``prompt_template.format(instruction=...)`` (instruction lowercased when
    ``lowercase_instruction``, as OpenVLA does); if the processor declares an ``image_token`` (LLaVA-style)
    that the prompt lacks, it is prepended once so the processor can place the image.
    """

    backbone_name: str  # set by @register_backbone

    def __init__(self, model: Any, processor: Any, *, source: str, hidden_dim: int, device: torch.device,
                 dtype: torch.dtype, options: dict[str, Any]) -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self.hidden_dim = hidden_dim
        self.device = device
        self.dtype = dtype
        self.prompt_template: str = options["prompt_template"]
        self.image_key: str = options["image_key"]
        self.lowercase_instruction: bool = options["lowercase_instruction"]
        self._options = options

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
        local_files_only: bool | None = None,
        prompt_template: str = DEFAULT_PROMPT,
        image_key: str = FULL_IMAGE,
        padding_side: str | None = None,
        lowercase_instruction: bool = True,
    ) -> "HFBackbone":
        """Load model + AutoProcessor from a local directory or a hub id.

        Args:
            dtype: weights dtype; None = bfloat16 on CUDA, float32 on CPU.
            trust_remote_code: run the checkpoint's own Python code; only when you pass True.
            local_files_only: None = True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set; a local
                directory is always read directly.
            padding_side: "left"/"right" overrides the tokenizer's padding side; None keeps it.
        Raises CheckpointNotFoundError (missing path, or a hub id neither cached nor downloadable),
        ConfigError (bad options, no model class fits, custom code without trust_remote_code).
        """
        if "{instruction}" not in prompt_template:
            raise ConfigError(f"prompt_template must contain '{{instruction}}', got {prompt_template!r}.")
        if padding_side not in (None, "left", "right"):
            raise ConfigError(f"padding_side must be None, 'left' or 'right', got {padding_side!r}.")
        if not isinstance(trust_remote_code, bool):
            raise ConfigError(f"trust_remote_code must be a bool, got {trust_remote_code!r}.")
        device = torch.device(device)
        torch_dtype = _resolve_dtype(dtype, device)
        source, is_local = _resolve_source(path_or_id)
        offline = hf_offline_mode() if local_files_only is None else bool(local_files_only)
        import transformers  # here, not at module import: it takes seconds

        load = dict(trust_remote_code=trust_remote_code, local_files_only=offline or is_local)
        try:
            config = transformers.AutoConfig.from_pretrained(source, **load)
            processor = transformers.AutoProcessor.from_pretrained(source, **load)
            model = _load_model(source, config, dtype=torch_dtype, **load)
        except OSError as err:
            where = ("offline mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE or local_files_only=True) and "
                     "it is not in the local cache" if offline else "it could not be found or downloaded")
            raise CheckpointNotFoundError(
                f"cannot load Hugging Face model {source!r}: {where}. Download it first "
                f"(`hf download {source}`) or pass a local directory. Cause: {err}"
            ) from err
        except ValueError as err:
            if "trust_remote_code" in str(err):
                raise ConfigError(f"{source!r} ships custom code; pass trust_remote_code=True if you trust "
                                  f"it. Cause: {err}") from err
            raise
        if padding_side is not None:
            tokenizer = getattr(processor, "tokenizer", None)
            if tokenizer is None:
                raise ConfigError(f"padding_side={padding_side!r} needs a processor with a tokenizer; "
                                  f"{type(processor).__name__} has none.")
            tokenizer.padding_side = padding_side
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden_dim = getattr(text_config, "hidden_size", None)
        if not isinstance(hidden_dim, int):
            raise ConfigError(f"{type(config).__name__} has no integer text hidden_size; cannot size the heads.")
        model = model.to(device).eval()
        options = dict(
            path_or_id=source, dtype=_dtype_name(torch_dtype) if dtype is not None else None,
            trust_remote_code=trust_remote_code, local_files_only=local_files_only,
            prompt_template=prompt_template, image_key=image_key, padding_side=padding_side,
            lowercase_instruction=lowercase_instruction,
        )
        return cls(model, processor, source=source, hidden_dim=hidden_dim, device=device, dtype=torch_dtype,
                   options=options)

    build = from_pretrained  # build_backbone("hf", path_or_id=..., ...)

    def prompt(self, instruction: str) -> str:
        """The text the processor gets for one instruction."""
        text = self.prompt_template.format(
            instruction=instruction.lower() if self.lowercase_instruction else instruction
        )
        image_token = getattr(self.processor, "image_token", None)
        if isinstance(image_token, str) and image_token and image_token not in text:
            text = image_token + text
        return text

    def inputs(self, observation: dict, instruction: str | list[str]) -> dict[str, torch.Tensor]:
        """Processor outputs on the model's device (floating tensors in the model dtype)."""
        images = _images_for_processor(observation, self.image_key)
        prompts = [self.prompt(text) for text in instructions_for_batch(instruction, len(images))]
        batch = self.processor(text=prompts, images=images, return_tensors="pt", padding=True)
        return {
            key: value.to(self.device, dtype=self.dtype if value.is_floating_point() else value.dtype)
            for key, value in batch.items() if isinstance(value, torch.Tensor)
        }

    def encode(self, observation: dict, instruction: str | list[str], *, check: bool = True) -> torch.Tensor:
        """observation[image_key] uint8 [H, W, 3] or [B, H, W, 3] + instruction(s) -> float32 [B, D];
        ``check``: through ``check_hidden`` (the default), else unchecked for a caller that checks it once."""
        inputs = self.inputs(observation, instruction)
        # no_grad, not inference_mode: heads train on this output, and inference tensors refuse autograd
        autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with torch.no_grad(), autocast:
            out = self.model(**inputs, output_hidden_states=True, return_dict=True)
        states = getattr(out, "hidden_states", None)
        if not states:
            raise ConfigError(f"{type(self.model).__name__} returned no hidden_states with "
                              f"output_hidden_states=True; it cannot serve as a backbone.")
        final = states[-1]  # [B, T', D]
        batch, length = final.shape[0], final.shape[1]
        mask = inputs.get("attention_mask")
        if mask is None:
            if batch != 1:
                raise ShapeError(f"the processor returned no attention_mask for a batch of {batch}; the last "
                                 f"real token of padded prompts is unknown. Encode one element at a time.")
            mask = torch.ones(1, inputs["input_ids"].shape[1], dtype=torch.int64, device=final.device)
        last = last_real_token_index(mask, sequence_length=length).to(final.device)  # [B]
        hidden = final[torch.arange(batch, device=final.device), last].float()  # [B, D]
        return check_hidden(hidden, self.hidden_dim) if check else hidden

    # save / load (see rsd.backbones.base): the checkpoint is referenced, not copied

    def spec_kwargs(self) -> dict[str, Any]:
        return dict(self._options)

    def save_weights(self, directory: Path) -> None:
        """Writes nothing: the spec references the checkpoint by its path or hub id."""

    @classmethod
    def load_spec(cls, kwargs: dict[str, Any], directory: Path, *, device: str | torch.device = "cpu") -> "HFBackbone":
        _check_spec_kwargs(cls.from_pretrained, kwargs, "HFBackbone", exclude=("device",))
        return cls.from_pretrained(**kwargs, device=device)
