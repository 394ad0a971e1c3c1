"""Build a tiny OpenVLA-OFT checkpoint directory offline (no downloads), laid out like the real one.

    from tests._openvla_tiny import build_tiny_oft_checkpoint, tiny_observation
    path = build_tiny_oft_checkpoint(tmp_path / "openvla-7b-oft-finetuned-libero-spatial")
    backbone = OpenVLAOFTBackbone.from_pretrained(path, "libero_spatial", device="cpu", dtype="float32")

Files: ``config.json`` (OpenVLA keys, tiny tower ids, a Llama text_config), two safetensors shards +
``model.safetensors.index.json``, ``proprio_projector--150000_checkpoint.pt`` (DDP ``module.`` prefixes,
as OFT saves it) and ``action_head--150000_checkpoint.pt`` (torch.save), ``dataset_statistics.json``,
``preprocessor_config.json`` and a word-level tokenizer with ``<s>``/``</s>`` and the empty token ``▁``.
Weights: ``random_openvla_model(OpenVLAShape.tiny(), seed=seed)`` in float32.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from rsd.backbones.openvla_arch import OpenVLAShape
from rsd.backbones.openvla_inputs import PROMPT_TEMPLATE, observation_spec
from rsd.backbones.openvla_shaped import random_openvla_model

INSTRUCTIONS = ("pick up the black bowl between the plate and the ramekin and place it on the plate",
                "put the bowl on the stove", "open the drawer")

ACTION_STATS = {"q01": [-0.75, -0.8, -0.9, -0.1, -0.15, -0.2, 0.0], "q99": [0.9, 0.85, 0.95, 0.12, 0.2, 0.3, 1.0],
                "mask": [True] * 6 + [False], "mean": [0.0] * 7, "std": [0.5] * 7}
PROPRIO_STATS = {"q01": [-0.3, -0.3, 0.8, 2.5, -1.0, -0.5, 0.0, -0.04],
                 "q99": [0.2, 0.3, 1.3, 3.3, 1.0, 0.5, 0.04, 0.0], "mean": [0.0] * 8, "std": [0.1] * 8}


def build_tiny_tokenizer():
    """Word-level: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``▁`` 3, then the words of the prompts; ``<s>`` prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    text = " ".join(PROMPT_TEMPLATE.format(instruction=i) for i in INSTRUCTIONS)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3}
    for word in sorted(set(re.findall(r"\w+|[^\w\s]+", text))):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny_oft_checkpoint(directory: str | Path, *, stats_keys: tuple[str, ...] = ("libero_spatial_no_noops",),
                              name_or_path: str = "", seed: int = 0) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shape = OpenVLAShape.tiny()
    model = random_openvla_model(shape, device="cpu", dtype=torch.float32, seed=seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}

    vla = {k: v for k, v in state.items() if k.startswith(("vision_backbone.", "projector.", "language_model."))}
    keys = sorted(vla)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, names in shards.items():
        save_file({k: vla[k] for k in names}, str(directory / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    proprio = {"module." + k.removeprefix("proprio_projector."): v for k, v in state.items()
               if k.startswith("proprio_projector.")}
    torch.save(proprio, directory / "proprio_projector--150000_checkpoint.pt")
    head = {k.removeprefix("action_head."): v for k, v in state.items() if k.startswith("action_head.")}
    torch.save(head, directory / "action_head--150000_checkpoint.pt")

    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(directory)
    llm = shape.llm
    config = {
        "architectures": ["OpenVLAForActionPrediction"], "model_type": "openvla", "_name_or_path": name_or_path,
        "use_fused_vision_backbone": True, "image_sizes": [28, 28],
        "timm_model_ids": [shape.featurizer.timm_id, shape.fused_featurizer.timm_id],
        "timm_override_act_layers": [None, None], "n_action_bins": 256, "pad_to_multiple_of": 64,
        "text_config": {"model_type": "llama", "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
                        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
                        "num_key_value_heads": llm.num_kv_heads, "vocab_size": llm.vocab_size,
                        "rms_norm_eps": llm.rms_norm_eps, "max_position_embeddings": llm.max_positions},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    stats = {key: {"action": ACTION_STATS, "proprio": PROPRIO_STATS, "num_transitions": 1000, "num_trajectories": 10}
             for key in stats_keys}
    (directory / "dataset_statistics.json").write_text(json.dumps(stats))
    processor = {"image_processor_type": "PrismaticImageProcessor", "image_resize_strategy": "resize-naive",
                 "input_sizes": [[3, 28, 28], [3, 28, 28]], "means": [list(shape.featurizer.mean), list(shape.fused_featurizer.mean)],
                 "stds": [list(shape.featurizer.std), list(shape.fused_featurizer.std)], "use_fused_vision_backbone": True}
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    return directory


def tiny_observation(seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
    """A valid observation for the tiny checkpoint: both cameras at 28 px and the 8-d state."""
    return observation_spec(OpenVLAShape.tiny()).fake(seed, batch=batch)
