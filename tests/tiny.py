"""A tiny random-weight LLaVA built in code (CLIP-style tower, MLP projector, Llama decoder) with
an offline character-level tokenizer and a real `LlavaProcessor`. Used by the tests and, until the
trained testbed model ships, by `dyrate demo`. Nothing is downloaded."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {{ m['content'] if m['content'] is string else m['content'][0]['text'] }}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character plus the special tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(string.printable[:95]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(
    n_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2, image_size: int = 32, patch: int = 8,
    max_positions: int = 512,
) -> LlavaConfig:
    vocab = len(SPECIALS) + 95
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=SPECIALS.index("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch) ** 2, tie_word_embeddings=False,
    )


def tiny_model(seed: int = 0, **config_kwargs) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random tiny LLaVA and its processor, deterministic from `seed`."""
    config = tiny_config(**config_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Random init gives near-uniform logits; sharpen the head so greedy decoding is not a coin toss.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    size = config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_center_crop=True, do_resize=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=char_tokenizer(),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 3
    return model, processor


def save_tiny(path: str | Path, seed: int = 0, **config_kwargs) -> Path:
    """Write a tiny checkpoint directory (config, safetensors, tokenizer, processor)."""
    path = Path(path)
    model, processor = tiny_model(seed, **config_kwargs)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def assert_rows_equal_alone(model, processor, images, prompts, **kwargs) -> None:
    """Every row of one batched `dyrate.generate` call equals that row run alone: the same tokens
    and the same kept counts at every step (kwargs: policy, mode, num_beams, max_new_tokens, ...)."""
    import dyrate

    together = dyrate.generate(model, processor, images, prompts, **kwargs)
    for i in range(len(prompts)):
        alone = dyrate.generate(model, processor, images[i:i + 1], prompts[i:i + 1], **kwargs)[0]
        assert together[i].token_ids == alone.token_ids, i
        assert [e["kept"] for e in together[i].trace] == [e["kept"] for e in alone.trace], i
