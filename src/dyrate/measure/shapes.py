"""Random-weight models of named shapes, and benchmark inputs for any supported family.

The 7B shapes are faithful to the published configs (decoder and vision tower), so speed and
memory measured on them are those of the real model's architecture; `layers` truncates the decoder
(and `vision_layers` the vision tower, for quick tests). Inputs are a system text, one image and an
instruction, as the family's processor would lay them out; pixels are random. The image's token
count follows from its side (`IMAGE_SIDE`, per family) where the family gives larger images more
tokens (Qwen2-VL, LLaVA-NeXT, OneVision)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError

_CLIP_L336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14)
_VICUNA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)
_QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4)

# name -> (family, vision tower, decoder, family extras)
RANDOM_CONFIGS = {
    "medium": ("llava", dict(_CLIP_L336, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                             num_attention_heads=4),
               dict(_VICUNA_7B, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=4096), {}),
    "llava-1.5-7b": ("llava", _CLIP_L336, _VICUNA_7B, {}),
    "llava-1.5-13b": ("llava", _CLIP_L336, dict(_VICUNA_7B, hidden_size=5120, intermediate_size=13824,
                                                 num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40), {}),
    # llava-v1.6-vicuna-7b: CLIP ViT-L/14-336, anyres grids up to 672 px
    "llava-next-7b": ("llava_next", _CLIP_L336, _VICUNA_7B, dict(
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])),
    # llava-onevision-qwen2-7b-ov: SigLIP-so400m-384 (26 layers used), Qwen2-7B, anyres_max_9
    "llava-onevision-7b": ("llava_onevision",
                           dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                                num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14),
                           dict(_QWEN2_7B, model_type="qwen2", vocab_size=152128),
                           dict(image_grid_pinpoints=[[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
                                vision_aspect_ratio="anyres_max_9")),
    # Qwen2.5-VL-7B-Instruct
    "qwen2.5-vl-7b": ("qwen2_5_vl",
                      dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
                      dict(_QWEN2_7B, vocab_size=152064,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
                      {}),
}
IMAGE_SIDE = {"llava": None, "llava_next": 672, "llava_onevision": 384, "qwen2_vl": 448, "qwen2_5_vl": 448}


def _truncate(cfg: dict, key: str, layers: int | None, name: str, flag: str) -> dict:
    cfg = dict(cfg)
    if layers is not None:
        if not 1 <= layers <= cfg[key]:
            raise InputError(f"{flag} {layers}: {name} has 1..{cfg[key]} layers there")
        cfg[key] = layers
    return cfg


def random_model(name: str, layers: int | None = None, dtype=torch.float32, device="cpu", seed: int = 0,
                 vision_layers: int | None = None):
    """A random-weight model of a named shape, its decoder optionally truncated to `layers` layers."""
    import transformers

    if name not in RANDOM_CONFIGS:
        raise InputError(f"unknown config {name!r}; known: {', '.join(RANDOM_CONFIGS)}")
    family, vision, text, extra = RANDOM_CONFIGS[name]
    text = _truncate(text, "num_hidden_layers", layers, name, "--layers")
    depth = "depth" if family.startswith("qwen") else "num_hidden_layers"
    vision = _truncate(vision, depth, vision_layers, name, "vision layers")
    vocab = text["vocab_size"]
    text.update(max_position_embeddings=32768, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family.startswith("qwen"):
        config = transformers.Qwen2_5_VLConfig(
            vision_config=vision, text_config=text, image_token_id=vocab - 1, video_token_id=vocab - 2,
            vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4)
        model_cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        config_cls, model_cls = {
            "llava": (transformers.LlavaConfig, transformers.LlavaForConditionalGeneration),
            "llava_next": (transformers.LlavaNextConfig, transformers.LlavaNextForConditionalGeneration),
            "llava_onevision": (transformers.LlavaOnevisionConfig, transformers.LlavaOnevisionForConditionalGeneration),
        }[family]
        strategy = "full" if family == "llava_onevision" else "default"
        extra = dict(extra, image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2) if family == "llava" else extra
        config = config_cls(vision_config=vision, text_config=text, image_token_id=vocab - 1,
                            vision_feature_layer=-1 if family == "llava_onevision" else -2,
                            vision_feature_select_strategy=strategy, **extra)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype)
    return model.eval()


@dataclass
class BenchInputs:
    """A batch of identical-layout rows: input_ids / attention_mask (B, P), vision inputs as the
    model takes them, and the prompt's token counts."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    vision: dict[str, torch.Tensor]
    n_sys: int
    n_img: int
    n_ins: int


def _image_inputs(model, batch: int, gen: torch.Generator, side: int | None):
    """Vision inputs for `batch` random images and the image tokens one image becomes."""
    cfg = model.config
    kind = cfg.model_type
    side = side or IMAGE_SIDE.get(kind)
    if kind == "llava":
        size = cfg.vision_config.image_size
        pixels = torch.randn(batch, 3, size, size, generator=gen)
        return {"pixel_values": pixels}, (size // cfg.vision_config.patch_size) ** 2
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        v = cfg.vision_config
        grid = side // (v.patch_size * v.spatial_merge_size) * v.spatial_merge_size  # patches per side
        n_patches = grid * grid  # one temporal patch (a still image is repeated to temporal_patch_size)
        dim = 3 * v.temporal_patch_size * v.patch_size**2
        vision = {"pixel_values": torch.randn(batch * n_patches, dim, generator=gen),
                  "image_grid_thw": torch.tensor([[1, grid, grid]] * batch)}
        return vision, n_patches // v.spatial_merge_size**2
    if kind in ("llava_next", "llava_onevision"):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        crops = image_size_to_num_patches((side, side), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        size = cfg.vision_config.image_size
        vision = {"pixel_values": torch.randn(batch, crops, 3, size, size, generator=gen),
                  "image_sizes": torch.tensor([[side, side]] * batch)}
        from ..adapters import adapter_for

        with torch.inference_mode():  # the packed feature count (crops unpadded, newlines) of one image
            one = {k: v[:1].to(model.device) for k, v in vision.items()}
            n_img = sum(f.shape[0] for f in adapter_for(model)._image_features(one))
        return vision, n_img
    raise InputError(f"no benchmark inputs for model_type {kind!r}")


def make_inputs(model, batch: int, text_tokens: int, device, seed: int = 0, image_side: int | None = None) -> BenchInputs:
    """Token ids with system / image / instruction tokens (3:1 text split), an all-ones mask and
    random pixels for `batch` rows of one layout."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    vision, n_img = _image_inputs(model, batch, gen, image_side)
    n_sys = (3 * text_tokens) // 4
    n_ins = text_tokens - n_sys
    vocab = cfg.get_text_config().vocab_size
    low, high = 3, vocab - 8  # clear of the special ids at both ends
    sys_ids = torch.randint(low, high, (batch, n_sys), generator=gen)
    ins_ids = torch.randint(low, high, (batch, n_ins), generator=gen)
    img_ids = torch.full((batch, n_img), cfg.image_token_id)
    ids = torch.cat([sys_ids, img_ids, ins_ids], dim=1).to(device)  # (B, P)
    if cfg.model_type in ("qwen2_vl", "qwen2_5_vl"):
        vision["mm_token_type_ids"] = (ids == cfg.image_token_id).int()
    vision = {k: (v.to(device, model.dtype) if v.is_floating_point() else v.to(device)) for k, v in vision.items()}
    return BenchInputs(ids, torch.ones_like(ids), vision, n_sys, n_img, n_ins)
