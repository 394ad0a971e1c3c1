"""Public names keep working where users import them from: the README's pieces, and what modules that were split
up (rsd.eval, rsd.policy, rsd.gpu_bench, rsd.backbones.openvla / openvla_shaped, rsd.sim.libero) exported before."""

from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.unit

PUBLIC = {
    "rsd.tokenizer": ["RFSQTokenizer"],
    "rsd.layout": ["logits_to_codes", "codes_to_layers", "layers_to_codes", "flat_to_canonical", "canonical_to_flat"],
    "rsd.heads": ["HeadState", "RFSQHead", "DraftHead", "L1ActionHead"],
    "rsd.speculative": ["MODES", "SpecStats", "SpeculativeDecoder", "greedy_decode"],
    "rsd.normalize": ["NormStats", "BoundsNormalizer", "BoundsQ99Normalizer", "NORMALIZATIONS", "resolve_unnorm_key",
                      "load_dataset_statistics"],
    "rsd.observation": ["FULL_IMAGE", "WRIST_IMAGE", "STATE", "RAW", "IMAGE_KEYS", "ObservationSpec"],
    "rsd.images": ["oft_model_input", "center_crop_image", "lanczos3_resize", "jpeg_round_trip", "rotate_180"],
    "rsd.backbones": ["Backbone", "TinyBackbone", "HFBackbone", "OpenVLAOFTBackbone", "OpenVLAShapedBackbone",
                      "check_hidden", "build_backbone", "load_backbone", "save_backbone", "register_backbone"],
    # the names of the single-module rsd.policy, and what the package added
    "rsd.policy": ["ActionChunk", "Policy", "RSDPolicy", "L1Policy", "load_policy", "fast_plan", "FastPlan",
                   "OFTL1Policy", "RFSQRoundTripPolicy", "make_policy", "policy_identity", "ActionPostprocessor"],
    # the names of the single-module rsd.eval
    "rsd.eval": ["HELP", "add_arguments", "run", "EvalConfig", "EpisodeKey", "EpisodeResult", "EpisodeOutcome",
                 "ResultsFile", "evaluate", "run_episode", "seed_everything", "summarize", "format_table",
                 "parse_task_ids"],
    # the names of the single-module rsd.gpu_bench
    "rsd.gpu_bench": ["measure_ceilings", "time_cuda", "time_wall", "summarize", "count_flops", "kernel_breakdown",
                      "full_accept_draft", "run_breakdown", "heads_breakdown", "format_breakdown", "main"],
    # what rsd.backbones.openvla exported before its guard rails moved to openvla_checkpoint (OFTL1Policy is
    # rsd.policy.OFTL1Policy now: backbones never import policies)
    "rsd.backbones.openvla": ["OpenVLAOFTBackbone", "LIBERO_SUITES", "BASE_MODELS", "check_suite", "suites_named_in",
                              "shape_from_config", "load_oft_state_dict"],
    # what rsd.backbones.openvla_shaped exported before the architecture moved to its own modules
    "rsd.backbones.openvla_shaped": ["ViTSpec", "LlamaSpec", "OpenVLAShape", "OpenVLAModel", "OpenVLAShapedBackbone",
                                     "PROMPT_TEMPLATE", "IMAGE_KEYS", "observation_tensors", "stand_in_token_ids",
                                     "group_by_prompt", "ungroup", "enable_fast_path"],
    # LIBERO's set-up moved to rsd.sim.setup; scripts import it from rsd.sim.libero
    "rsd.sim.libero": ["make_env", "LiberoEnv", "list_tasks", "task_spec", "load_init_states", "make_observation",
                       "setup_libero", "ensure_libero_config", "select_renderer", "probe_renderer", "rsd_home",
                       "libero_package_root"],
    "rsd.sim.protocol": ["SUITES", "TASK_MAX_STEPS", "preprocess_image", "center_crop_image", "rotate_180",
                         "prompt_for", "proprio_from_obs", "validate_action", "dummy_action"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import(module: str) -> None:
    mod = importlib.import_module(module)
    assert [name for name in PUBLIC[module] if not hasattr(mod, name)] == []
    assert [name for name in getattr(mod, "__all__", ()) if not hasattr(mod, name)] == []  # __all__ holds no stale name
