"""Named model configurations of the testbed (`LlavaConfig`: CLIP vision tower, 2-layer MLP
projector, Llama decoder).

- "tiny": a few thousand parameters' worth of layers, for unit tests (seconds on one core).
- "base": the shipped testbed model (fp16 weights ~11 MB).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig


@dataclass(frozen=True)
class TestbedSpec:
    """Sizes of one named configuration."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_ffn: int

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SPECS: dict[str, TestbedSpec] = {
    "tiny": TestbedSpec(
        image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2, vision_ffn=64,
        text_hidden=64, text_layers=2, text_heads=4, text_kv_heads=4, text_ffn=128,
    ),
    "base": TestbedSpec(
        image_size=96, patch_size=8, vision_hidden=192, vision_layers=4, vision_heads=6, vision_ffn=576,
        text_hidden=256, text_layers=6, text_heads=8, text_kv_heads=8, text_ffn=512,
    ),
}  # fmt: skip


def get_spec(name: str) -> TestbedSpec:
    from ..errors import InputError

    if name not in SPECS:
        raise InputError(f"unknown testbed config {name!r}; known: {', '.join(SPECS)}")
    return SPECS[name]


def build_config(name: str, vocab_size: int, image_token_id: int, pad_token_id: int, bos_token_id: int, eos_token_id: int) -> LlavaConfig:
    """The `LlavaConfig` of a named spec, with sdpa attention.

    The vision features come from the *last* tower layer (`vision_feature_layer=-1`; LLaVA's -2
    suits a pretrained CLIP, but here it would waste the last layer), CLS dropped ('default').
    """
    s = get_spec(name)
    vision = CLIPVisionConfig(
        hidden_size=s.vision_hidden,
        intermediate_size=s.vision_ffn,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        image_size=s.image_size,
        patch_size=s.patch_size,
        projection_dim=s.vision_hidden,
        hidden_act="gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.text_hidden,
        intermediate_size=s.text_ffn,
        num_hidden_layers=s.text_layers,
        num_attention_heads=s.text_heads,
        num_key_value_heads=s.text_kv_heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=s.num_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    config._attn_implementation = "sdpa"
    config.pad_token_id = pad_token_id
    config.bos_token_id = bos_token_id
    config.eos_token_id = eos_token_id
    config.testbed = {"name": name, **asdict(s)}
    return config
