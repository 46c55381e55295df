"""Tiny random checkpoints of every supported family, built offline from their config classes:
what the tests load through `dyrate.load`, and what `dyrate testbed tiny --family F OUT` writes so
a user can try an adapter without downloading a model. Weights are random; the tokenizer is
character level (one token per printable ASCII character plus the family's special tokens) with
the family's own chat-template layout.

Families (docs/models.md): llava, llava-next, llava-onevision, qwen2-vl, qwen2.5-vl."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..adapters.processors import image_only, torchvision_works

FAMILIES = ("llava", "llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl")

_LLAVA_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>"]
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
_LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {{ m['content'] if m['content'] is string else m['content'][0]['text'] }}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(specials: list[str], pad: str, eos: str, template: str, **extra) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(specials + list(string.printable[:95]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1] if pad == "<pad>" else pad))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, padding_side="left",
                                   chat_template=template, **extra)


def _text(vocab: int, layers: int, hidden: int, eos: int, **extra) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                pad_token_id=0, bos_token_id=None, eos_token_id=eos, **extra)


def _llava_like(family: str, layers: int, hidden: int):
    from transformers import (CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaOnevisionConfig,
                              LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor, LlavaProcessor)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    tok = _tokenizer(_LLAVA_SPECIALS, "<pad>", "</s>", _LLAVA_TEMPLATE, unk_token="<unk>", bos_token="<s>",
                     extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    vocab, eos, image_id = len(tok), _LLAVA_SPECIALS.index("</s>"), _LLAVA_SPECIALS.index("<image>")
    size, patch = 32, 8
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=size, patch_size=patch)
    common = dict(text_config=dict(model_type="llama", **_text(vocab, layers, hidden, eos)), image_token_id=image_id,
                  vision_feature_layer=-1, tie_word_embeddings=False)
    mean_std = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    if family == "llava":
        config = LlavaConfig(vision_config=vision, vision_feature_select_strategy="default",
                             image_seq_length=(size // patch) ** 2, **common)
        ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **mean_std)
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, num_additional_image_tokens=1,
                              vision_feature_select_strategy="default", chat_template=_LLAVA_TEMPLATE)
        return LlavaForConditionalGeneration(config), proc
    pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
    if family == "llava-next":
        config = LlavaNextConfig(vision_config=vision, vision_feature_select_strategy="default",
                                 image_grid_pinpoints=pinpoints, **common)
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                        image_grid_pinpoints=pinpoints, **mean_std)
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=patch, num_additional_image_tokens=1,
                                  vision_feature_select_strategy="default", chat_template=_LLAVA_TEMPLATE)
        return LlavaNextForConditionalGeneration(config), proc
    # OneVision: SigLIP-style tower (no class token, every patch feature kept)
    vision = dict(vision, model_type="siglip_vision_model")
    config = LlavaOnevisionConfig(vision_config=vision, vision_feature_select_strategy="full",
                                  image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9", **common)
    ip = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size}, image_grid_pinpoints=pinpoints, **mean_std)
    cls = LlavaOnevisionProcessor if torchvision_works() else image_only(LlavaOnevisionProcessor)
    proc = cls(image_processor=ip, tokenizer=tok, num_image_tokens=(size // patch) ** 2,
               vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=_LLAVA_TEMPLATE)
    return LlavaOnevisionForConditionalGeneration(config), proc


def _qwen(family: str, layers: int, hidden: int):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = {t: i for i, t in enumerate(_QWEN_SPECIALS)}
    tok = _tokenizer(_QWEN_SPECIALS, "<|endoftext|>", "<|im_end|>", _QWEN_TEMPLATE,
                     extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    head_dim = hidden // 4
    text = _text(len(tok), layers, hidden, ids["<|im_end|>"],
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                  "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]})
    vision = dict(depth=2, hidden_size=hidden, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    v15 = family == "qwen2.5-vl"
    vision.update(dict(out_hidden_size=hidden, intermediate_size=64, fullatt_block_indexes=[1], window_size=56)
                  if v15 else dict(embed_dim=32))
    config_cls, model_cls, proc_cls = ((Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)
                                       if v15 else (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor))
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    # 56..112 px a side: 4..16 merged image tokens per image (one per 28x28 pixels)
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    cls = proc_cls if torchvision_works() else image_only(proc_cls)
    return model_cls(config), cls(image_processor=ip, tokenizer=tok, chat_template=_QWEN_TEMPLATE)


def tiny_family(family: str, seed: int = 0, layers: int = 4, hidden: int = 64):
    """A tiny random model of `family` and its processor, deterministic from `seed`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
    torch.manual_seed(seed)
    model, proc = (_qwen if family.startswith("qwen") else _llava_like)(family, layers, hidden)
    model.eval()
    with torch.no_grad():  # random init gives near-uniform logits: sharpen the head so greedy is no coin toss
        model.lm_head.weight.mul_(8.0)
    tok = proc.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    return model, proc


def save_family(family: str, path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Write a tiny checkpoint directory of `family` (config, safetensors, tokenizer, processor)."""
    path = Path(path)
    model, proc = tiny_family(family, seed, **kwargs)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path
