"""HFBackbone on a tiny LLaVA-style model built offline from a config (tests/_hf_tiny.py); CPU, seconds."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from rsd.backbones import HFBackbone, backbone_spec, build_backbone, load_backbone, save_backbone
from rsd.config import RSDConfig
from rsd.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    DeadHiddenStateError,
    DTypeError,
    ShapeError,
)
from rsd.observation import FULL_IMAGE, WRIST_IMAGE, ObservationSpec
from tests._hf_tiny import build_tiny_hf_vlm

pytestmark = pytest.mark.integration

D = RSDConfig.tiny().hidden_dim
INSTRUCTIONS = [
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "open the top drawer",
    "Put The Bowl On The Stove",
]


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory):
    return build_tiny_hf_vlm(tmp_path_factory.mktemp("tiny_vlm") / "vlm", hidden_dim=D)


@pytest.fixture(scope="module")
def right(vlm_dir) -> HFBackbone:
    return HFBackbone.from_pretrained(vlm_dir, padding_side="right")


@pytest.fixture(scope="module")
def left(vlm_dir) -> HFBackbone:
    return HFBackbone.from_pretrained(vlm_dir, padding_side="left")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return ObservationSpec(images=(FULL_IMAGE,)).fake(0, batch=len(INSTRUCTIONS))[FULL_IMAGE]  # [B, 224, 224, 3]


def test_shape_dtype_finite(right: HFBackbone, images: np.ndarray) -> None:
    assert right.hidden_dim == D
    hidden = right.encode({FULL_IMAGE: images}, INSTRUCTIONS)
    assert hidden.shape == (len(INSTRUCTIONS), D) and hidden.dtype == torch.float32
    assert torch.isfinite(hidden).all()
    one = right.encode({FULL_IMAGE: images[0]}, INSTRUCTIONS[0])  # unbatched image -> B = 1
    assert one.shape == (1, D)


def test_hidden_is_frozen_but_usable_for_training_a_head(right: HFBackbone, images: np.ndarray) -> None:
    hidden = right.encode({FULL_IMAGE: images}, INSTRUCTIONS)
    assert not hidden.requires_grad and not hidden.is_inference()
    head = torch.nn.Linear(D, 3)
    head(hidden).square().mean().backward()  # inference tensors would raise here
    assert head.weight.grad is not None and bool(head.weight.grad.abs().sum() > 0)


def test_prompt_is_openvla_prompt_with_image_token(right: HFBackbone) -> None:
    assert right.prompt("Open The Drawer") == "<image>In: What action should the robot take to open the drawer?\nOut:"


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_real_token_matches_manual_selection(request, side: str, images: np.ndarray) -> None:
    backbone: HFBackbone = request.getfixturevalue(side)
    inputs = backbone.inputs({FULL_IMAGE: images}, INSTRUCTIONS)
    ids, pad = inputs["input_ids"], backbone.processor.tokenizer.pad_token_id
    lengths = (ids != pad).sum(dim=1)
    assert len(set(lengths.tolist())) == len(INSTRUCTIONS), "prompts must differ in length so padding happens"
    # manual: scan the token ids for the last non-pad token, independently of the attention mask
    with torch.inference_mode():
        states = backbone.model(**inputs, output_hidden_states=True).hidden_states[-1]  # [B, T, D]
    rows = []
    for b in range(ids.shape[0]):
        real = [t for t in range(ids.shape[1]) if ids[b, t] != pad]
        assert real == list(range(real[0], real[-1] + 1)), "padding must sit on one side only"
        assert (real[0] == 0) if side == "right" else (real[-1] == ids.shape[1] - 1)
        rows.append(states[b, real[-1]])
    manual = torch.stack(rows).float()
    assert torch.equal(backbone.encode({FULL_IMAGE: images}, INSTRUCTIONS), manual)
    if side == "right":  # there, the naive "last position" pick lands on padding for the shorter prompts
        assert not torch.allclose(manual, states[:, -1].float())


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_element_alone(request, side: str, images: np.ndarray) -> None:
    backbone: HFBackbone = request.getfixturevalue(side)
    batch = backbone.encode({FULL_IMAGE: images}, INSTRUCTIONS)
    alone = torch.cat([backbone.encode({FULL_IMAGE: images[i]}, text) for i, text in enumerate(INSTRUCTIONS)])
    assert torch.allclose(batch, alone, rtol=1e-4, atol=1e-5), (batch - alone).abs().max()


def test_left_and_right_padding_agree(left: HFBackbone, right: HFBackbone, images: np.ndarray) -> None:
    a = left.encode({FULL_IMAGE: images}, INSTRUCTIONS)
    b = right.encode({FULL_IMAGE: images}, INSTRUCTIONS)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()


def test_deterministic_and_input_sensitive(vlm_dir, right: HFBackbone, images: np.ndarray) -> None:
    obs = {FULL_IMAGE: images}
    first = right.encode(obs, INSTRUCTIONS)
    assert torch.equal(first, right.encode(obs, INSTRUCTIONS))
    assert torch.equal(first, HFBackbone.from_pretrained(vlm_dir, padding_side="right").encode(obs, INSTRUCTIONS))
    other_text = right.encode({FULL_IMAGE: images[:1]}, "open the bottom drawer")
    other_image = right.encode({FULL_IMAGE: images[1:2]}, INSTRUCTIONS[0])
    assert not torch.allclose(first[:1], other_text, atol=1e-4)
    assert not torch.allclose(first[:1], other_image, atol=1e-4)


def test_spec_round_trip_and_registry(tmp_path, vlm_dir, right: HFBackbone, images: np.ndarray) -> None:
    spec = save_backbone(right, tmp_path)
    assert list(tmp_path.iterdir()) == []  # the checkpoint is referenced, not copied
    assert spec == backbone_spec(right) == json.loads(json.dumps(spec))
    assert spec["name"] == "hf" and spec["kwargs"]["path_or_id"] == str(vlm_dir.resolve())
    loaded = load_backbone(spec, tmp_path)
    built = build_backbone("hf", path_or_id=vlm_dir, padding_side="right")
    obs = {FULL_IMAGE: images}
    expected = right.encode(obs, INSTRUCTIONS)
    assert torch.equal(loaded.encode(obs, INSTRUCTIONS), expected)
    assert torch.equal(built.encode(obs, INSTRUCTIONS), expected)


def test_bad_observations(right: HFBackbone, images: np.ndarray) -> None:
    with pytest.raises(ShapeError, match=FULL_IMAGE):
        right.encode({WRIST_IMAGE: images}, "open the drawer")
    with pytest.raises(DTypeError, match="uint8"):
        right.encode({FULL_IMAGE: images.astype(np.float32)}, INSTRUCTIONS)
    with pytest.raises(ShapeError, match=r"\[H, W, 3\]"):
        right.encode({FULL_IMAGE: images[..., :1]}, INSTRUCTIONS)
    with pytest.raises(ShapeError, match="2 instructions for a batch of 3"):
        right.encode({FULL_IMAGE: images}, INSTRUCTIONS[:2])


def test_dead_hidden_state_is_loud(vlm_dir, images: np.ndarray) -> None:
    backbone = HFBackbone.from_pretrained(vlm_dir)
    with torch.no_grad():
        backbone.model.model.language_model.norm.weight.zero_()  # the final RMSNorm now outputs zeros
    with pytest.raises(DeadHiddenStateError, match="all zero"):
        backbone.encode({FULL_IMAGE: images}, INSTRUCTIONS)
    unchecked = backbone.encode({FULL_IMAGE: images}, INSTRUCTIONS, check=False)  # the caller checks it once
    assert unchecked.shape == (len(INSTRUCTIONS), D) and not unchecked.any()


# offline mode and missing checkpoints


class _Spy:
    """Stands in for AutoConfig.from_pretrained: records its kwargs and fails the way a cache miss does."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, source, **kwargs):
        self.calls.append(dict(kwargs, source=source))
        raise OSError(f"{source} is not in the cache (spy)")


@pytest.mark.parametrize(
    ("env", "explicit", "expected"),
    [({"HF_HUB_OFFLINE": "1"}, None, True), ({"TRANSFORMERS_OFFLINE": "1"}, None, True),
     ({}, None, False), ({"HF_HUB_OFFLINE": "1"}, False, False), ({}, True, True)],
)
def test_offline_env_sets_local_files_only_for_hub_ids(monkeypatch, env: dict, explicit, expected: bool) -> None:
    import transformers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spy = _Spy()
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    with pytest.raises(CheckpointNotFoundError, match="rsd-tests/not-a-model") as info:
        HFBackbone.from_pretrained("rsd-tests/not-a-model", local_files_only=explicit)
    assert spy.calls == [dict(source="rsd-tests/not-a-model", trust_remote_code=False, local_files_only=expected)]
    assert ("offline mode is on" in str(info.value)) is expected


def test_offline_hub_id_not_cached_raises_without_network(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="offline mode is on"):
        HFBackbone.from_pretrained("rsd-tests/definitely-not-cached-vlm")


def test_offline_local_dir_loads(monkeypatch, vlm_dir, right: HFBackbone, images: np.ndarray) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    backbone = HFBackbone.from_pretrained(str(vlm_dir), padding_side="right")
    assert torch.equal(backbone.encode({FULL_IMAGE: images}, INSTRUCTIONS),
                       right.encode({FULL_IMAGE: images}, INSTRUCTIONS))


def test_missing_weights_file_raises(tmp_path, vlm_dir) -> None:
    broken = shutil.copytree(vlm_dir, tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="broken"):
        HFBackbone.from_pretrained(broken)


# trust_remote_code

_REMOTE_CODE = '''
from transformers import LlavaConfig, LlavaForConditionalGeneration


class RsdTinyRemoteConfig(LlavaConfig):
    model_type = "{model_type}"


class RsdTinyRemoteVLM(LlavaForConditionalGeneration):
    config_class = RsdTinyRemoteConfig
'''


def _with_remote_code(src, dst, *, model_type: str, current_key_names: bool):
    """Copy the tiny VLM and make its config point at checkpoint-shipped code (like OpenVLA's auto_map)."""
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    dst = shutil.copytree(src, dst)
    (dst / "modeling_rsd_tiny.py").write_text(_REMOTE_CODE.format(model_type=model_type))
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "modeling_rsd_tiny.RsdTinyRemoteConfig",
                          "AutoModelForVision2Seq": "modeling_rsd_tiny.RsdTinyRemoteVLM"}
    (dst / "config.json").write_text(json.dumps(config))
    if current_key_names:  # save_pretrained writes LLaVA's legacy key names, which only class "llava" renames
        model = LlavaForConditionalGeneration.from_pretrained(src)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dst / "model.safetensors"),
                  metadata={"format": "pt"})
    return dst


def test_remote_code_only_when_trusted(tmp_path, vlm_dir, right: HFBackbone, images: np.ndarray) -> None:
    remote = _with_remote_code(vlm_dir, tmp_path / "remote", model_type="rsd_tiny_remote_vlm",
                               current_key_names=True)
    with pytest.raises(ConfigError, match="trust_remote_code=True"):
        HFBackbone.from_pretrained(remote)
    backbone = HFBackbone.from_pretrained(remote, trust_remote_code=True, padding_side="right")
    assert type(backbone.model).__name__ == "RsdTinyRemoteVLM"
    assert torch.allclose(backbone.encode({FULL_IMAGE: images}, INSTRUCTIONS),
                          right.encode({FULL_IMAGE: images}, INSTRUCTIONS), rtol=1e-5, atol=1e-6)


def test_checkpoint_with_missing_weights_is_refused(tmp_path, vlm_dir) -> None:
    """transformers would initialise the missing lm_head randomly and only log it; rsd refuses."""
    remote = _with_remote_code(vlm_dir, tmp_path / "legacy", model_type="llava", current_key_names=False)
    with pytest.raises(CheckpointMismatchError, match="lm_head"):
        HFBackbone.from_pretrained(remote, trust_remote_code=True)
