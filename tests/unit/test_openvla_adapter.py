"""OpenVLA-OFT adapter on a tiny checkpoint built locally (tests/_openvla_tiny.py): strict loading,
guard rails, unnorm keys, the token layouts, and the architecture's parity with transformers' Llama."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rsd.backbones import build_backbone, load_backbone, save_backbone
from rsd.backbones.openvla import OpenVLAOFTBackbone
from rsd.policy.oft import OFTL1Policy
from rsd.backbones.openvla_checkpoint import check_suite, load_oft_state_dict, suites_named_in
from rsd.backbones.openvla_arch import OpenVLAShape
from rsd.backbones.openvla_llama import LlamaDecoder, LlamaSpec
from rsd.backbones.openvla_shaped import OpenVLAShapedBackbone, stand_in_token_ids
from rsd.errors import (ActionGenerationError, CheckpointMismatchError, CheckpointNotFoundError, ConfigError,
                        ShapeError, UnknownUnnormKeyError, WrongBaseModelError)
from rsd.images import center_crop_image, oft_model_input
from rsd.sim.protocol import preprocess_image
from tests._openvla_tiny import INSTRUCTIONS, build_tiny_oft_checkpoint, tiny_observation

pytestmark = pytest.mark.unit

SPATIAL = "openvla-7b-oft-finetuned-libero-spatial"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_oft_checkpoint(tmp_path_factory.mktemp("ckpt") / SPATIAL)


@pytest.fixture(scope="module")
def backbone(checkpoint: Path) -> OpenVLAOFTBackbone:
    return OpenVLAOFTBackbone.from_pretrained(checkpoint, "libero_spatial", device="cpu", dtype="float32")


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# loading: every tensor from the files, nothing random


def test_every_tensor_comes_from_the_checkpoint_bit_for_bit(checkpoint: Path, backbone: OpenVLAOFTBackbone) -> None:
    files = load_oft_state_dict(checkpoint, device=torch.device("cpu"))
    own = backbone.model.state_dict()
    assert set(own) == set(files)
    for key, value in own.items():
        assert torch.equal(value, files[key]), key
    assert not any(t.is_meta for t in [*backbone.model.parameters(), *backbone.model.buffers()])
    assert "proprio_projector.fc1.weight" in files  # the DDP "module." prefix was removed
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in files  # OpenVLA's LayerScale name
    assert "vision_backbone.fused_featurizer.attn_pool.kv.weight" in files
    assert "language_model.lm_head.weight" in files


def test_loading_never_initialises_a_real_tensor(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hook every torch.nn.init function: during from_pretrained they may only touch meta tensors."""
    touched: list[tuple[str, tuple[int, ...]]] = []
    for name in ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "ones_", "zeros_", "constant_",
                 "xavier_uniform_", "xavier_normal_"):
        original = getattr(torch.nn.init, name)

        def hooked(tensor, *args, _original=original, _name=name, **kwargs):
            if not tensor.is_meta:
                touched.append((_name, tuple(tensor.shape)))
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, hooked)
    OpenVLAOFTBackbone.from_pretrained(checkpoint, "libero_spatial", device="cpu", dtype="float32")
    assert touched == []


@pytest.mark.parametrize("edit", ["missing", "unexpected", "reshaped"])
def test_strict_load_rejects_mismatched_weights(checkpoint: Path, tmp_path: Path, edit: str) -> None:
    ckpt = _copy_checkpoint(checkpoint, tmp_path / SPATIAL)
    shard = ckpt / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    key = sorted(tensors)[0]
    if edit == "missing":
        del tensors[key]
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        del index["weight_map"][key]
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    elif edit == "unexpected":
        tensors["language_model.model.extra.weight"] = torch.ones(3)
    else:
        tensors[key] = torch.ones(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointMismatchError, match=edit):
        OpenVLAOFTBackbone.from_pretrained(ckpt, "libero_spatial", device="cpu", dtype="float32")


@pytest.mark.parametrize("component", ["action_head", "proprio_projector", "dataset_statistics.json", "config.json"])
def test_missing_files_raise_not_found(checkpoint: Path, tmp_path: Path, component: str) -> None:
    ckpt = _copy_checkpoint(checkpoint, tmp_path / SPATIAL)
    for f in ckpt.iterdir():
        if f.name.startswith(component):
            f.unlink()
    with pytest.raises(CheckpointNotFoundError, match=component.split(".")[0]):
        OpenVLAOFTBackbone.from_pretrained(ckpt, "libero_spatial", device="cpu", dtype="float32")


def test_missing_directory_and_unreachable_hub_raise_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        OpenVLAOFTBackbone.from_pretrained(tmp_path / "nope", "libero_spatial", device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match="hub"):
        OpenVLAOFTBackbone.from_pretrained("someone/openvla-7b-oft-finetuned-libero-spatial", "libero_spatial",
                                           device="cpu", local_files_only=True)


# guard rails and unnorm keys


def test_suite_names_are_parsed_from_checkpoint_names() -> None:
    assert suites_named_in("moojink/openvla-7b-oft-finetuned-libero-spatial") == {"libero_spatial"}
    assert suites_named_in("moojink/openvla-7b-oft-finetuned-libero-spatial-object-goal-10") == {
        "libero_spatial", "libero_object", "libero_goal", "libero_10"}
    assert suites_named_in("/ckpts/openvla_oft_libero_10") == {"libero_10"}
    assert suites_named_in("openvla/openvla-7b") == set()


@pytest.mark.parametrize("name, keys, suite, match", [
    ("openvla/openvla-7b", ["bridge_orig", "fractal20220817_data"], "libero_spatial", "base model"),
    ("/x/openvla-7b", ["libero_spatial_no_noops"], "libero_spatial", "base model"),
    ("moojink/openvla-7b-oft-finetuned-libero-spatial", ["libero_spatial_no_noops"], "libero_object", "name .* says"),
    ("/ckpt/my-run", ["libero_spatial_no_noops"], "libero_goal", "no 'libero_goal'"),
])
def test_wrong_base_model_is_refused(name: str, keys: list[str], suite: str, match: str) -> None:
    with pytest.raises(WrongBaseModelError, match=match):
        check_suite(name, keys, suite)
    assert check_suite(name, keys, suite, allow_suite_mismatch=True)  # the override returns the problems


def test_matching_checkpoints_pass_and_unknown_suites_fail() -> None:
    assert check_suite("moojink/openvla-7b-oft-finetuned-libero-spatial-object-goal-10",
                       ["libero_object_no_noops"], "libero_object") == []
    with pytest.raises(ConfigError, match="unknown LIBERO suite"):
        check_suite("x", ["libero_spatial"], "libero_spatial_no_noops")


def test_loader_refuses_a_spatial_checkpoint_for_object_unless_overridden(checkpoint: Path) -> None:
    with pytest.raises(WrongBaseModelError, match="libero_object"):
        OpenVLAOFTBackbone.from_pretrained(checkpoint, "libero_object", device="cpu", dtype="float32")
    with pytest.raises(UnknownUnnormKeyError, match="libero_spatial_no_noops"):  # the override still needs a key
        OpenVLAOFTBackbone.from_pretrained(checkpoint, "libero_object", allow_suite_mismatch=True, device="cpu",
                                           dtype="float32")
    bb = OpenVLAOFTBackbone.from_pretrained(checkpoint, "libero_object", allow_suite_mismatch=True,
                                            unnorm_key="libero_spatial_no_noops", device="cpu", dtype="float32")
    assert bb.unnorm_key == "libero_spatial_no_noops"


@pytest.mark.parametrize("key", ["libero_object_no_noops", "bridge_orig"])
def test_an_explicit_unnorm_key_of_another_dataset_is_refused_unless_overridden(tmp_path: Path, key: str) -> None:
    ckpt = build_tiny_oft_checkpoint(tmp_path / SPATIAL,
                                     stats_keys=("libero_spatial_no_noops", "libero_object_no_noops", "bridge_orig"))
    with pytest.raises(WrongBaseModelError, match=key):
        OpenVLAOFTBackbone.from_pretrained(ckpt, "libero_spatial", unnorm_key=key, device="cpu", dtype="float32")
    bb = OpenVLAOFTBackbone.from_pretrained(ckpt, "libero_spatial", unnorm_key=key, allow_suite_mismatch=True,
                                            device="cpu", dtype="float32")
    assert bb.unnorm_key == key
    # the suite's own keys stay accepted when named explicitly
    assert OpenVLAOFTBackbone.from_pretrained(ckpt, "libero_spatial", unnorm_key="libero_spatial_no_noops",
                                              device="cpu", dtype="float32").unnorm_key == "libero_spatial_no_noops"


def test_base_model_directory_is_refused(tmp_path: Path) -> None:
    base = build_tiny_oft_checkpoint(tmp_path / "openvla-7b", stats_keys=("bridge_orig",))
    with pytest.raises(WrongBaseModelError, match="base model"):
        OpenVLAOFTBackbone.from_pretrained(base, "libero_spatial", device="cpu", dtype="float32")


def test_config_name_or_path_is_checked_too(tmp_path: Path) -> None:
    ckpt = build_tiny_oft_checkpoint(tmp_path / "run-17", stats_keys=("libero_object_no_noops",),
                                     name_or_path="moojink/openvla-7b-oft-finetuned-libero-spatial")
    with pytest.raises(WrongBaseModelError, match="libero_spatial"):
        OpenVLAOFTBackbone.from_pretrained(ckpt, "libero_object", device="cpu", dtype="float32")


def test_unnorm_key_prefers_the_plain_suite_name(tmp_path: Path) -> None:
    ckpt = build_tiny_oft_checkpoint(tmp_path / "oft-libero-10", stats_keys=("libero_10_no_noops", "libero_10"))
    assert OpenVLAOFTBackbone.from_pretrained(ckpt, "libero_10", device="cpu", dtype="float32").unnorm_key == "libero_10"
    with pytest.raises(UnknownUnnormKeyError, match="libero_10_no_noops"):
        OpenVLAOFTBackbone.from_pretrained(ckpt, "libero_10", unnorm_key="libero_goal", device="cpu", dtype="float32")


# the token layouts


def test_prompt_ids_follow_oft(backbone: OpenVLAOFTBackbone) -> None:
    ids = backbone.prompt_ids(INSTRUCTIONS[1]).tolist()
    tok = backbone.tokenizer
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids("\u2581")
    prompt = "In: What action should the robot take to put the bowl on the stove?\nOut:"
    assert tok.convert_ids_to_tokens(ids[1:-1]) == re.findall(r"\w+|[^\w\s]+", prompt)
    assert tok.unk_token_id not in ids


def test_encode_is_the_last_prompt_token_of_oft_layout(backbone: OpenVLAOFTBackbone) -> None:
    obs = tiny_observation(1)
    hidden = backbone.encode(obs, INSTRUCTIONS[0])
    assert hidden.shape == (1, 32) and hidden.dtype == torch.float32
    m = backbone.model
    images = torch.from_numpy(np.stack([center_crop_image(obs["full_image"]), center_crop_image(obs["wrist_image"])]))[None]
    proprio = torch.from_numpy(backbone._proprio_normalizer.normalize(obs["state"][None]))
    ids = backbone.prompt_ids(INSTRUCTIONS[0])[None]
    with torch.inference_mode():
        text = m.language_model.model.embed_tokens(ids)
        patches = m.projector(m.vision_backbone(images, torch.float32))
        seq = torch.cat([text[:, :1], patches, m.proprio_projector(proprio)[:, None], text[:, 1:]], dim=1)
        assert seq.shape[1] == 1 + 2 * 4 + 1 + ids.shape[1] - 1
        expected = m.language_model(seq)[:, -1]
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)


def test_l1_actions_read_oft_action_slice(backbone: OpenVLAOFTBackbone) -> None:
    """OFT feeds its head hidden[:, NUM_PATCHES + NUM_PROMPT_TOKENS : +56]: pinned with the tiny sizes."""
    obs = tiny_observation(2)
    m = backbone.model
    ids = backbone.prompt_ids(INSTRUCTIONS[2])[None]  # <s> + prompt + "▁"
    images = torch.from_numpy(np.stack([center_crop_image(obs["full_image"]), center_crop_image(obs["wrist_image"])]))[None]
    proprio = torch.from_numpy(backbone._proprio_normalizer.normalize(obs["state"][None]))
    with torch.inference_mode():
        text = m.language_model.model.embed_tokens(ids)
        vision = m.vision_embeds(images, proprio)  # [1, 9, D]: 2 images x 4 patches + proprio
        stop = m.language_model.model.embed_tokens(torch.tensor([[2]]))
        seq = torch.cat([text[:, :1], vision, text[:, 1:], torch.zeros(1, 56, 32), stop], dim=1)
        hidden = m.language_model(seq)
        num_patches, num_prompt = 9, ids.shape[1] - 1
        expected = m.action_head(hidden[:, num_patches + num_prompt: num_patches + num_prompt + 56])
    actions = backbone.predict_actions(obs, INSTRUCTIONS[2])
    assert actions.shape == (1, 8, 7)
    torch.testing.assert_close(actions, expected, rtol=0, atol=0)


def _camera_frames(seed: int, batch: int | None = None) -> dict[str, np.ndarray]:
    """Raw camera frames (upside down, 40 px) with smooth structure, as LIBERO renders them."""
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    yy, xx = np.mgrid[0:40, 0:40]
    base = np.stack([4 * yy, 5 * xx, 3 * (xx + yy)], axis=-1)
    return {k: np.clip(base + rng.integers(0, 60, (*lead, 40, 40, 3)), 0, 255).astype(np.uint8)
            for k in ("agentview", "wrist")}


@pytest.mark.parametrize("batch", [None, 2])
def test_the_model_sees_oft_cropped_pixels_for_both_views(backbone: OpenVLAOFTBackbone, batch: int | None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """observation (OFT's uncropped 28 px images) -> the pixels fed to the model are oft_model_input(frame)."""
    frames = _camera_frames(7, batch)
    prep = (lambda f, **kw: preprocess_image(f, size=28, **kw)) if batch is None else \
        (lambda f, **kw: np.stack([preprocess_image(x, size=28, **kw) for x in f]))
    obs = {"full_image": prep(frames["agentview"]), "wrist_image": prep(frames["wrist"]),
           "state": np.zeros((8,) if batch is None else (batch, 8), np.float32)}
    seen = []
    real = backbone._hidden_fn
    monkeypatch.setattr(backbone, "_hidden_fn", lambda images, ids, state: seen.append(images.clone()) or real(images, ids, state))
    backbone.encode(obs, INSTRUCTIONS[0] if batch is None else [INSTRUCTIONS[0]] * batch)
    fed = torch.cat(seen).numpy()  # [B, views, 28, 28, 3] uint8, as the vision towers receive them
    for view, key in enumerate(("agentview", "wrist")):
        want = frames[key][None] if batch is None else frames[key]
        expected = np.stack([oft_model_input(f, size=28) for f in want])
        np.testing.assert_array_equal(fed[:, view], expected)
        assert not np.array_equal(fed[:, view], np.stack([oft_model_input(f, size=28, center_crop=False) for f in want]))
    assert obs["full_image"].shape[-3:] == (28, 28, 3)  # the observation itself is untouched (uncropped)
    np.testing.assert_array_equal(obs["full_image"], prep(frames["agentview"]))


def test_center_crop_false_feeds_the_uncropped_images_and_is_part_of_the_spec(
        checkpoint: Path, tmp_path: Path) -> None:
    bb = OpenVLAOFTBackbone.from_pretrained(checkpoint, "libero_spatial", device="cpu", dtype="float32",
                                            center_crop=False)
    obs = tiny_observation(6)
    for key in ("full_image", "wrist_image"):
        np.testing.assert_array_equal(bb.model_images(obs)[key], obs[key])
    spec = save_backbone(bb, tmp_path / "policy")
    assert spec["kwargs"]["center_crop"] is False
    again = load_backbone(spec, tmp_path / "policy", device="cpu")
    assert again.center_crop is False
    with pytest.raises(ConfigError, match="center_crop"):
        OpenVLAOFTBackbone.from_pretrained(checkpoint, "libero_spatial", device="cpu", dtype="float32", center_crop="yes")


def test_batched_encode_with_different_prompt_lengths(backbone: OpenVLAOFTBackbone) -> None:
    obs = tiny_observation(3, batch=3)
    texts = [INSTRUCTIONS[0], INSTRUCTIONS[1], INSTRUCTIONS[0]]
    batched = backbone.encode(obs, texts)
    singles = torch.cat([backbone.encode({k: v[i] for k, v in obs.items()}, t) for i, t in enumerate(texts)])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-5)


def test_bad_observations_raise(backbone: OpenVLAOFTBackbone) -> None:
    obs = tiny_observation(0)
    with pytest.raises(ShapeError, match="wrist_image"):
        backbone.encode({k: v for k, v in obs.items() if k != "wrist_image"}, "open the drawer")
    with pytest.raises(ShapeError, match="28, 28, 3"):
        backbone.encode({**obs, "full_image": np.zeros((32, 32, 3), np.uint8)}, "open the drawer")


def test_l1_policy_returns_env_ready_chunk(backbone: OpenVLAOFTBackbone) -> None:
    policy = OFTL1Policy(backbone)
    chunk = policy.predict_chunk(tiny_observation(4), INSTRUCTIONS[0])
    assert chunk.actions.shape == (8, 7) and chunk.actions.dtype == np.float32
    assert set(np.unique(chunk.actions[:, -1])) <= {-1.0, 0.0, 1.0}
    normalized = backbone.predict_actions(tiny_observation(4), INSTRUCTIONS[0])[0].numpy()
    q01, q99 = np.array([-0.75, -0.8, -0.9, -0.1, -0.15, -0.2]), np.array([0.9, 0.85, 0.95, 0.12, 0.2, 0.3])
    np.testing.assert_allclose(chunk.actions[:, :6], 0.5 * (normalized[:, :6] + 1) * (q99 - q01) + q01, rtol=1e-5, atol=1e-6)
    with pytest.raises(ActionGenerationError, match="full_image"):
        policy.predict_chunk({"state": np.zeros(8, np.float32)}, INSTRUCTIONS[0])


def test_spec_round_trip_and_fast_path_needs_cuda(checkpoint: Path, backbone: OpenVLAOFTBackbone, tmp_path: Path) -> None:
    spec = save_backbone(backbone, tmp_path / "policy")
    assert spec["name"] == "openvla-oft" and spec["kwargs"]["suite"] == "libero_spatial"
    again = load_backbone({**spec, "kwargs": {**spec["kwargs"], "dtype": "float32"}}, tmp_path / "policy", device="cpu")
    obs = tiny_observation(5)
    torch.testing.assert_close(again.encode(obs, INSTRUCTIONS[1]), backbone.encode(obs, INSTRUCTIONS[1]))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            backbone.set_fast(True)


# the architecture against transformers' Llama, and the shaped backbone


def test_llama_decoder_matches_transformers_causal() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = LlamaSpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, vocab_size=50,
                     rms_norm_eps=1e-5, rope_theta=500.0, max_positions=64)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=50, rms_norm_eps=1e-5, rope_theta=500.0,
                      max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    reference = LlamaForCausalLM(cfg).eval()
    ours = LlamaDecoder(spec, causal=True)
    ours.load_state_dict(reference.state_dict(), strict=True)  # the same parameter names
    embeds = torch.randn(2, 11, 32)
    with torch.inference_mode():
        expected = reference(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(ours(embeds), expected, rtol=1e-5, atol=1e-5)


def test_bidirectional_attention_sees_later_tokens() -> None:
    torch.manual_seed(0)
    spec = OpenVLAShape.tiny().llm
    bidirectional, causal = LlamaDecoder(spec, causal=False), LlamaDecoder(spec, causal=True)
    for module in (bidirectional, causal):
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.2)
    causal.load_state_dict(bidirectional.state_dict())
    x = torch.randn(1, 6, 32)
    y = x.clone()
    y[:, -1] += 1.0
    with torch.inference_mode():
        assert not torch.allclose(bidirectional(x)[:, 0], bidirectional(y)[:, 0])
        torch.testing.assert_close(causal(x)[:, :-1], causal(y)[:, :-1])


def test_shaped_backbone_tiny_encodes_and_cannot_be_saved(tmp_path: Path) -> None:
    bb = build_backbone("openvla-shaped", size="tiny", device="cpu")
    hidden = bb.encode(tiny_observation(0), INSTRUCTIONS[0])
    assert hidden.shape == (1, 32) and torch.isfinite(hidden).all()
    ids = stand_in_token_ids("In: What action should the robot take to open the drawer?\nOut:", 300)
    assert ids[0] == 1 and len(ids) == 1 + 16 + 1 and all(3 <= i < 300 for i in ids[1:])  # 12 words, ?, \n, Out, :
    with pytest.raises(ConfigError, match="random weights"):
        save_backbone(bb, tmp_path)
    with pytest.raises(ConfigError, match="size"):
        OpenVLAShapedBackbone("13b", device="cpu")


def test_optimize_for_inference_keeps_the_function_and_the_state_dict() -> None:
    from rsd.backbones.openvla_shaped import random_openvla_model

    model = random_openvla_model(OpenVLAShape.tiny(), device="cpu", dtype=torch.float32, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    obs = tiny_observation(6, batch=2)
    images = torch.from_numpy(np.stack([obs["full_image"], obs["wrist_image"]], axis=1))
    ids = torch.tensor([stand_in_token_ids("In: What action should the robot take to open the drawer?\nOut:", 300)] * 2)
    proprio = torch.from_numpy(obs["state"])
    with torch.inference_mode():
        reference = model.rsd_hidden(images, ids, proprio)
        reference_l1 = model.l1_actions(images, ids, proprio, stop_id=2)
        model.optimize_for_inference()
        torch.testing.assert_close(model.rsd_hidden(images, ids, proprio), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.l1_actions(images, ids, proprio, stop_id=2), reference_l1, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    attn = model.language_model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.qkv.data_ptr()  # a view of the fused matrix, no copy
    # the functions optimize_for_inference(compile=True) compiles compute the same thing (run uncompiled here)
    from rsd.backbones.openvla_llama import llama_layer_fn
    from rsd.backbones.openvla_towers import vit_block_fn

    for layer in model.language_model.model.layers:
        layer.kernel = llama_layer_fn
    for block in [*model.vision_backbone.featurizer.blocks, *model.vision_backbone.fused_featurizer.blocks]:
        block.kernel = vit_block_fn
    with torch.inference_mode():
        torch.testing.assert_close(model.rsd_hidden(images, ids, proprio), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.l1_actions(images, ids, proprio, stop_id=2), reference_l1, rtol=1e-5, atol=1e-5)


def test_greedy_rollout_of_the_graphed_decoder_equals_greedy_decode() -> None:
    """What rsd.fastpath.GraphedRSDDecoder captures, run eagerly on the CPU (catches drift of the heads' internals)."""
    from rsd.config import RSDConfig
    from rsd.fastpath import greedy_rollout
    from rsd.heads import RFSQHead
    from rsd.speculative import greedy_decode
    from rsd.tokenizer import RFSQTokenizer

    cfg = RSDConfig.tiny()
    torch.manual_seed(0)
    head, tok = RFSQHead(cfg).eval(), RFSQTokenizer.from_config(cfg).eval()
    hidden = torch.randn(3, cfg.hidden_dim)
    with torch.inference_mode():
        state = head.start(hidden)
        codes, actions = greedy_rollout(head, tok, state.base, state.context)
        expected = greedy_decode(head, hidden)
        assert torch.equal(codes, expected)
        assert torch.equal(actions, tok.decode_from_indices(expected))
