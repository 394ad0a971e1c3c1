"""rsd: Residual-FSQ action tokens with speculative decoding, validated on LIBERO.

The public surface, one concept per module (see docs/design.md)::

    rsd.config.RSDConfig            sizes of everything
    rsd.tokenizer.RFSQTokenizer     actions [B,C,A] <-> codes [B,C,H,L]
    rsd.layout                      logits/codes layouts (einops)
    rsd.heads                       RFSQHead, DraftHead, L1ActionHead
    rsd.speculative                 SpeculativeDecoder, greedy_decode
    rsd.normalize                   NormStats, BoundsNormalizer (bounds / bounds_q99), gripper conventions
    rsd.observation                 the observation contract (keys, ObservationSpec: validate, fake)
    rsd.images                      camera frame -> OpenVLA-OFT's exact model input (oft_model_input)
    rsd.backbones                   Backbone protocol, TinyBackbone, HFBackbone, OpenVLA-OFT
    rsd.policy                      Policy protocol, ActionChunk, RSDPolicy, L1Policy, load_policy
    rsd.sim                         LIBERO protocol, env, the episode loop, scripted experts
    rsd.eval                        the evaluation runner (`rsd eval`)
    rsd.collect                     `rsd collect`: demonstrations recorded to HDF5

Submodules are imported on use so that ``import rsd`` stays light.
"""

from rsd.config import RSDConfig

__version__ = "0.1.0"

__all__ = ["RSDConfig", "__version__"]
