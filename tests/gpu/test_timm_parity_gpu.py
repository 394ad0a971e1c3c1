"""rsd's ViT towers against timm's (what OpenVLA's own code builds): same parameter names and shapes at
the full DINOv2-L/14-reg4 and SigLIP-So400m/14 sizes, and the same features (OpenVLA's forward: the
output of block depth-2, prefix tokens dropped). Runs where timm is installed (the GPU image has it)."""

from __future__ import annotations

import pytest
import torch

from rsd.backbones.openvla_towers import DINOV2_L14_REG4, SIGLIP_SO400M_14, TimmViT

pytestmark = pytest.mark.gpu
timm = pytest.importorskip("timm", reason="timm is not installed (the GPU image has timm 1.0)")

# timm ids and kwargs as OpenVLA creates them (timm_override_act_layers None -> timm's default GELU)
TOWERS = {"dinov2": (DINOV2_L14_REG4, "vit_large_patch14_reg4_dinov2"),
          "siglip": (SIGLIP_SO400M_14, "vit_so400m_patch14_siglip_224")}


def _timm_tower(name: str, device: str) -> torch.nn.Module:
    spec, timm_id = TOWERS[name]
    with torch.device(device):
        return timm.create_model(timm_id, pretrained=False, num_classes=0, img_size=spec.image_size,
                                 act_layer="gelu").eval()


def _openvla_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's state dict with OpenVLA's LayerScale rename (``gamma`` -> ``scale_factor``)."""
    return {k.replace(".gamma", ".scale_factor") if ".ls" in k else k: v for k, v in model.state_dict().items()}


def _openvla_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """OpenVLA's ``_intermediate_layers(n={depth-2})`` + prefix removal, on a timm model."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixels))))
    for block in model.blocks[: len(model.blocks) - 1]:
        x = block(x)
    return x[:, model.num_prefix_tokens:]


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_parameter_names_and_shapes_match_timm(name: str) -> None:
    spec = TOWERS[name][0]
    reference = {k: tuple(v.shape) for k, v in _openvla_state(_timm_tower(name, "meta")).items()}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in TimmViT(spec).state_dict().items()}
    assert ours == reference


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_features_match_timm_float32(name: str, cuda) -> None:
    spec = TOWERS[name][0]
    torch.manual_seed(0)
    reference = _timm_tower(name, "cuda").float()
    for module in reference.modules():  # LayerScale 1e-5 would hide the blocks: make them count
        if hasattr(module, "gamma"):
            torch.nn.init.uniform_(module.gamma, 0.5, 1.0)
    ours = TimmViT(spec).to(cuda).eval()
    ours.load_state_dict(_openvla_state(reference), strict=True)
    pixels = torch.randn(2, 3, spec.image_size, spec.image_size, device=cuda)
    with torch.inference_mode():
        expected = _openvla_features(reference, pixels)
        got = ours(pixels)
    assert got.shape == (2, spec.num_patches, spec.embed_dim)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
