"""Build a tiny LLaVA-style Hugging Face VLM offline (no downloads) for tests.

    from tests._hf_tiny import build_tiny_hf_vlm
    path = build_tiny_hf_vlm(tmp_path / "vlm")          # a save_pretrained directory
    backbone = HFBackbone.from_pretrained(path)         # hidden_dim 32 == RSDConfig.tiny().hidden_dim

Model: LlavaForConditionalGeneration = CLIP vision tower (32 px, 8 px patches -> 16 image tokens)
+ 2-layer Llama (hidden ``hidden_dim``). Tokenizer: byte-level BPE with no merges (one token per
UTF-8 byte), so every instruction tokenizes without unknown tokens and distinct strings give distinct
ids. Image processor: CLIP's PIL processor (no torchvision needed), resize + crop to 32 px.
Building and saving takes well under a second once transformers is imported.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def build_tiny_tokenizer():
    """Byte-level tokenizer: ids 0..3 = <pad> <s> </s> <image>, then one id per byte; BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, IMAGE_TOKEN]
    vocab = {token: i for i, token in enumerate(specials)}
    for char in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(char, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   padding_side="right")


def _clip_image_processor(image_size: int):
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def build_tiny_hf_vlm(directory: str | Path, *, hidden_dim: int = 32, image_size: int = 32, seed: int = 0) -> Path:
    """Create, save (``save_pretrained``: model + processor) and return ``directory``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    directory = Path(directory)
    tokenizer = build_tiny_tokenizer()
    patch = 8
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_dim, intermediate_size=2 * hidden_dim,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(image_processor=_clip_image_processor(image_size), tokenizer=tokenizer,
                               patch_size=patch, vision_feature_select_strategy="default",
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
