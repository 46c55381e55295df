"""Analytic FLOPs of a VLM decoder whose layers see different numbers of image tokens.

Conventions (docs/design.md, "FLOPs conventions"; name the convention beside every figure you report):

* Per decoder layer, hidden size d, FFN width m, with q new tokens attending to n keys:
  linear part ``q * (4 d^2 + 2 d m)`` (the ``"2dm"`` variant, FastV's paper; ``"3dm"`` counts the
  three matrices of a gated FFN such as Llama's), attention ``2 q n d``. Layer norms, softmax,
  RoPE, the embedding and the LM head are not counted, and the linear part assumes
  ``n_heads * head_dim == d`` with as many KV heads as query heads (FastV's simplification).
* ``prefill`` (FastV's Eq. 5): one forward over the prompt. Layer l sees ``n_l = text + img_l``
  tokens, all of them queries: ``F(n_l) = 4 n_l d^2 + 2 n_l^2 d + 2 n_l d m``.
* ``cached``: the prefill, then ``T-1`` decode steps with a KV cache (what generation executes).
  Decode step t = 1..T-1 has one query attending to ``img_l + text + t`` keys at layer l.
* ``nocache``: each of the T steps t = 0..T-1 recomputes the whole sequence,
  ``q = n = img_l + text + t`` at layer l (how several papers count generation).

``text_tokens`` counts every prompt token that is not an image token (system prompt and
instruction). Image-token counts are given per layer: the first K layers of a pruning policy
always see every image token, so even with every image token gone from layer K on the ratio
cannot fall below the *floor* (``floor_ratio``), which every report prints beside the ratio.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, InputError, PolicySpecError

CONVENTIONS = ("prefill", "cached", "nocache")
FFN_VARIANTS = ("2dm", "3dm")


@dataclass(frozen=True)
class DecoderShape:
    """What the FLOPs and KV-cache formulas need to know about a VLM's language decoder.

    hidden is d, ffn is the FFN width m, n_img the image tokens one image becomes; vocab is
    informational (the LM head is not counted).
    """

    name: str
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_img: int
    vocab: int | None = None
    passes: int = 1  # vision-tower passes per image at the stated resolution (LLaVA-NeXT: base image + crops)

    def __post_init__(self):
        for field in ("n_layers", "hidden", "ffn", "n_heads", "n_kv_heads", "head_dim", "n_img"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"decoder shape {self.name!r}: {field}={value!r} must be a positive integer")

    @classmethod
    def from_config(cls, config, name: str | None = None) -> "DecoderShape":
        """The shape of a supported VLM config: the decoder from ``text_config``; the image tokens
        (``_IMAGE_TOKENS``) from the vision tower for LLaVA, ``(image_size // patch_size)**2`` plus
        one (the CLS token) when ``vision_feature_select_strategy == "full"``. For the families whose
        image-token count depends on the image (LLaVA-NeXT, OneVision, Qwen2-VL) it is a nominal
        count (the base image's grid, or 256 for Qwen2-VL); per-request FLOPs use the request's own.

        ``image_seq_length`` is not used by the LLaVA model itself, so when it disagrees with the
        vision tower the vision tower wins and a warning says so.
        """
        text, vision = getattr(config, "text_config", None), getattr(config, "vision_config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in _IMAGE_TOKENS or text is None or vision is None:
            raise CheckpointError(
                f"not a supported VLM config (model_type {model_type!r}); dyrate flops supports model_type "
                + ", ".join(repr(t) for t in _IMAGE_TOKENS)
            )
        n_img = _IMAGE_TOKENS[model_type](config)
        declared = getattr(config, "image_seq_length", None) if model_type == "llava" else None
        if declared is not None and declared != n_img:
            warnings.warn(
                f"config image_seq_length={declared} but the vision tower gives {n_img} image tokens "
                f"(image_size {vision.image_size}, patch {vision.patch_size}, "
                f"strategy {config.vision_feature_select_strategy!r}); using {n_img}",
                stacklevel=2,
            )
        n_heads = text.num_attention_heads
        return cls(
            name=name or getattr(config, "name_or_path", "") or model_type,
            n_layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            ffn=text.intermediate_size,
            n_heads=n_heads,
            n_kv_heads=getattr(text, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // n_heads,
            n_img=n_img,
            vocab=getattr(text, "vocab_size", None),
        )


def _llava_tokens(config) -> int:
    side = config.vision_config.image_size // config.vision_config.patch_size
    return side * side + (1 if config.vision_feature_select_strategy == "full" else 0)


def _base_grid(config) -> int:
    side = config.vision_config.image_size // config.vision_config.patch_size
    return side * side


_IMAGE_TOKENS = {  # model_type -> image tokens of one image (nominal where it depends on the image)
    "llava": _llava_tokens,
    "llava_next": _base_grid,
    "llava_onevision": _base_grid,
    "qwen2_vl": lambda config: 256,
    "qwen2_5_vl": lambda config: 256,
}


NAMED_SHAPES: dict[str, DecoderShape] = {
    "llava-1.5-7b": DecoderShape(
        "llava-1.5-7b", n_layers=32, hidden=4096, ffn=11008, n_heads=32, n_kv_heads=32,
        head_dim=128, n_img=576, vocab=32064,
    ),
    "llava-1.5-13b": DecoderShape(
        "llava-1.5-13b", n_layers=40, hidden=5120, ffn=13824, n_heads=40, n_kv_heads=40,
        head_dim=128, n_img=576, vocab=32064,
    ),
    # The families below turn one image into a number of tokens that depends on its size; n_img is
    # the count for one stated resolution (docs/models.md); `dyrate flops --image-tokens` sets another.
    # Qwen2.5-VL-7B-Instruct: a 448x448 image -> (448 / 28)^2 = 256 merged tokens.
    "qwen2.5-vl-7b": DecoderShape(
        "qwen2.5-vl-7b", n_layers=28, hidden=3584, ffn=18944, n_heads=28, n_kv_heads=4,
        head_dim=128, n_img=256, vocab=152064,
    ),
    # llava-v1.6-vicuna-7b: a 672x672 image -> base 24x24 + a 2x2 crop grid (48x48) + 48 newlines.
    "llava-next-7b": DecoderShape(
        "llava-next-7b", n_layers=32, hidden=4096, ffn=11008, n_heads=32, n_kv_heads=32,
        head_dim=128, n_img=576 + 48 * 48 + 48, vocab=32064, passes=5,
    ),
    # llava-onevision-qwen2-7b: a 384x384 image -> base 27x27 + one crop (27x27) + 27 newlines.
    "llava-onevision-7b": DecoderShape(
        "llava-onevision-7b", n_layers=28, hidden=3584, ffn=18944, n_heads=28, n_kv_heads=4,
        head_dim=128, n_img=729 + 729 + 27, vocab=152128, passes=2,
    ),
}


def resolve_shape(name_or_dir: str | os.PathLike | DecoderShape) -> DecoderShape:
    """A named shape (see ``NAMED_SHAPES``) or a local checkpoint directory holding a LLaVA
    ``config.json`` (never downloads anything)."""
    if isinstance(name_or_dir, DecoderShape):
        return name_or_dir
    key = str(name_or_dir)
    if key.lower() in NAMED_SHAPES:
        return NAMED_SHAPES[key.lower()]
    path = Path(key)
    if not path.exists():
        raise CheckpointError(
            f"{key!r} is neither a known shape ({', '.join(NAMED_SHAPES)}) nor a checkpoint directory"
        )
    if path.is_file():  # a config.json given directly
        path = path.parent
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{key}: no config.json in this directory")
    try:  # check the model type first: AutoConfig's own error for other models is long
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{config_file}: unreadable config ({err})") from None
    if model_type not in _IMAGE_TOKENS:
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} is not supported; dyrate flops supports model_type "
            + ", ".join(repr(t) for t in _IMAGE_TOKENS)
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises many kinds; the user needs one line
        raise CheckpointError(f"{config_file}: cannot load the config ({str(err).splitlines()[0]})") from None
    return DecoderShape.from_config(config, name=str(path))


# --- the formulas -------------------------------------------------------------------------------


def _check_ffn(ffn: str) -> int:
    if ffn not in FFN_VARIANTS:
        raise InputError(f"unknown FFN convention {ffn!r}; expected one of {', '.join(FFN_VARIANTS)}")
    return int(ffn[0])  # matrices of width m in the FFN


MAX_TOKENS = 10**8  # far beyond any model's context; larger counts are typos (and lose float precision)


def _check_count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{what} must be a non-negative integer, got {value!r}")
    if value > MAX_TOKENS:
        raise InputError(f"{what}={value} is more tokens than any model holds (at most {MAX_TOKENS})")
    return value


def _check_counts(values: list, name) -> list[int]:
    """`_check_count` for a whole list at once (the cheap test first: this runs for every step of
    every generated row); name(i) names entry i in the message about the first bad one."""
    if not (all(type(v) is int for v in values) and min(values, default=0) >= 0
            and max(values, default=0) <= MAX_TOKENS):
        for i, v in enumerate(values):
            _check_count(v, name(i))
    return values


def layer_flops(shape: DecoderShape, q: int, n: int, ffn: str = "2dm") -> int:
    """FLOPs of one decoder layer where q new tokens attend to n keys:
    ``q (4 d^2 + 2 d m) + 2 q n d`` (``3 d m`` with ``ffn="3dm"``)."""
    c = _check_ffn(ffn)
    q, n = _check_count(q, "queries"), _check_count(n, "keys")
    d, m = shape.hidden, shape.ffn
    return q * (4 * d * d + c * d * m) + 2 * q * n * d


def _per_layer(shape: DecoderShape, values: int | Sequence[int], what: str) -> list[int]:
    if isinstance(values, int):
        return [values] * shape.n_layers
    values = list(values)
    if len(values) != shape.n_layers:
        raise InputError(f"{what}: got {len(values)} values for a decoder of {shape.n_layers} layers")
    return values


def forward_flops(
    shape: DecoderShape, q_per_layer: int | Sequence[int], n_per_layer: int | Sequence[int], ffn: str = "2dm"
) -> int:
    """FLOPs of one forward pass: ``layer_flops`` summed over layers (an int is used for every layer)."""
    c = _check_ffn(ffn)
    qs = _check_counts(_per_layer(shape, q_per_layer, "queries per layer"), lambda i: f"queries of layer {i}")
    ns = _check_counts(_per_layer(shape, n_per_layer, "keys per layer"), lambda i: f"keys of layer {i}")
    d, m = shape.hidden, shape.ffn  # = sum of layer_flops(q, n) over the layers, in one pass
    return (4 * d * d + c * d * m) * sum(qs) + 2 * d * sum(q * n for q, n in zip(qs, ns))


def _steps_needed(convention: str, new_tokens: int) -> int:
    if convention not in CONVENTIONS:
        raise InputError(f"unknown FLOPs convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")
    _check_count(new_tokens, "new_tokens")
    if convention == "prefill":
        return 1
    if new_tokens < 1:
        raise InputError(f"the {convention} convention needs new_tokens >= 1, got {new_tokens}")
    return new_tokens


def _image_steps(shape: DecoderShape, image_tokens, steps: int) -> list[list[int]]:
    """Normalise image tokens to one checked per-layer list per step (one list or int: every step)."""
    if not isinstance(image_tokens, int) and len(image_tokens) and isinstance(image_tokens[0], Sequence):
        if len(image_tokens) < steps or (steps > 1 and len(image_tokens) != steps):
            raise InputError(f"image tokens given for {len(image_tokens)} steps, the generation has {steps}")
        given = list(image_tokens[:steps])
    else:
        given = [image_tokens]
    per_step = []
    for t, layers in enumerate(given):
        layers = _per_layer(shape, layers, f"image tokens of step {t}")
        per_step.append(_check_counts(layers, lambda i, t=t: f"image tokens of layer {i} at step {t}"))
    return per_step if len(per_step) == steps else per_step * steps


def generation_flops(
    shape: DecoderShape,
    text_tokens: int,
    new_tokens: int,
    image_tokens: Sequence[int] | Sequence[Sequence[int]],
    convention: str = "prefill",
    ffn: str = "2dm",
) -> int:
    """FLOPs of generating ``new_tokens`` tokens under ``convention`` (see the module docstring).

    ``image_tokens`` is one per-layer list (a static policy: the same at every step) or a list
    over steps of per-layer lists (step 0 = prefill, then one per decode step: ``new_tokens``
    of them for ``cached``/``nocache``; ``prefill`` reads step 0 only).
    """
    steps = _steps_needed(convention, new_tokens)
    text_tokens = _check_count(text_tokens, "text_tokens")
    per_step = _image_steps(shape, image_tokens, steps)
    prompt = [img + text_tokens for img in per_step[0]]
    if convention == "prefill":
        return forward_flops(shape, prompt, prompt, ffn)
    if convention == "cached":
        decode = sum(
            forward_flops(shape, 1, [img + text_tokens + t for img in per_step[t]], ffn) for t in range(1, steps)
        )
        return forward_flops(shape, prompt, prompt, ffn) + decode
    total = 0  # nocache: every step recomputes the whole sequence
    for t in range(steps):
        seq = [img + text_tokens + t for img in per_step[t]]
        total += forward_flops(shape, seq, seq, ffn)
    return total


def flops_ratio(
    shape: DecoderShape,
    image_tokens: Sequence[int] | Sequence[Sequence[int]],
    text_tokens: int,
    new_tokens: int = 1,
    convention: str = "prefill",
    ffn: str = "2dm",
    full_image_tokens: int | None = None,
) -> dict:
    """FLOPs with ``image_tokens`` (as in ``generation_flops``) over FLOPs with every layer seeing
    all ``full_image_tokens`` (default ``shape.n_img``) at every step.

    Returns ``{"ratio", "flops", "full_flops", "convention", "ffn"}``.
    """
    full_img = shape.n_img if full_image_tokens is None else _check_count(full_image_tokens, "full_image_tokens")
    flops = generation_flops(shape, text_tokens, new_tokens, image_tokens, convention, ffn)
    per_step = _image_steps(shape, image_tokens, _steps_needed(convention, new_tokens))
    if any(count > full_img for layers in per_step for count in layers):
        raise InputError(f"a layer sees more image tokens than the {full_img} of the unpruned model")
    full = generation_flops(shape, text_tokens, new_tokens, [full_img] * shape.n_layers, convention, ffn)
    return {"ratio": flops / full, "flops": flops, "full_flops": full, "convention": convention, "ffn": ffn}


def floor_ratio(
    shape: DecoderShape, k: int, text_tokens: int, new_tokens: int = 1, convention: str = "prefill", ffn: str = "2dm"
) -> float:
    """The lowest ratio any policy pruning from layer k on can reach: every image token gone from
    layer k on (the first k layers always see them all). k=0 is a pre-LLM method's floor: every
    layer could lose every image token, so only the text is left."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < shape.n_layers:
        raise InputError(f"k={k!r}: the first pruned layer must lie in 0..{shape.n_layers - 1}")
    counts = [shape.n_img] * k + [0] * (shape.n_layers - k)
    return flops_ratio(shape, counts, text_tokens, new_tokens, convention, ffn)["ratio"]


def prefill_floor(shape: DecoderShape, k: int, text_tokens: int, ffn: str = "2dm") -> float:
    """``floor_ratio`` in the prefill convention, about ``k/L + (L-k)/L * text share``."""
    return floor_ratio(shape, k, text_tokens, 1, "prefill", ffn)


def request_bytes(shape: DecoderShape, rows: int, seq: int, dtype_bytes: int = 4) -> int:
    """A generous upper estimate of the memory one generate call needs beyond the weights: rows
    (batch x beams) whose sequences reach `seq` tokens hold a full KV cache, the prefill's widest
    activations (a few (rows, seq, max(d, m)) tensors) and float32 logits over the vocabulary."""
    kv = 2 * shape.n_layers * rows * seq * shape.n_kv_heads * shape.head_dim * dtype_bytes
    activations = 4 * rows * seq * max(shape.hidden, shape.ffn) * dtype_bytes
    logits = 3 * rows * (shape.vocab or 32_000) * 4
    return kv + activations + logits


def kv_cache_bytes(
    shape: DecoderShape, tokens_per_layer: Sequence[int], batch: int = 1, dtype_bytes: int = 2
) -> int:
    """Bytes of a KV cache holding ``tokens_per_layer[l]`` tokens at layer l for ``batch`` rows:
    ``2 (K and V) * n_kv_heads * head_dim * dtype_bytes * sum(tokens_per_layer) * batch``."""
    tokens = _per_layer(shape, list(tokens_per_layer), "cached tokens per layer")
    for layer, count in enumerate(tokens):
        _check_count(count, f"cached tokens of layer {layer}")
    for value, what in ((batch, "batch"), (dtype_bytes, "dtype_bytes")):
        if _check_count(value, what) < 1:
            raise InputError(f"{what} must be >= 1, got {value}")
    return 2 * shape.n_kv_heads * shape.head_dim * dtype_bytes * sum(tokens) * batch


def policy_flops(
    shape: DecoderShape,
    policy_spec,
    text_tokens: int,
    new_tokens: int = 1,
    convention: str = "prefill",
    ffn: str = "2dm",
) -> dict:
    """FLOPs of a static policy (spec string or Policy) without running a model.

    Returns ``flops_ratio``'s keys plus ``policy`` (its spec), ``k`` (first pruned layer, None if
    the policy never prunes), ``floor`` (``floor_ratio`` at that k in the same convention, None
    without k), ``image_tokens`` (per layer), ``retained`` (mean fraction of image tokens seen by
    layers k..L-1) and ``kv_cache_bytes`` / ``full_kv_cache_bytes`` (fp16, batch 1, the cache at the
    end of the generation: prompt plus ``new_tokens - 1`` tokens).
    """
    from ..policies import parse_policy

    policy = parse_policy(policy_spec)
    policy.validate(shape.n_layers)
    counts = (policy.static_image_tokens(shape.n_img, shape.n_layers, passes=shape.passes) if policy.pre_llm
              else policy.static_image_tokens(shape.n_img, shape.n_layers))
    if counts is None:
        raise PolicySpecError(
            f"{policy.spec()}: its FLOPs depend on the data; run it with `dyrate generate --json` "
            "to get its measured FLOPs"
        )
    result = flops_ratio(shape, counts, text_tokens, new_tokens, convention, ffn)
    k = 0 if policy.pre_llm else min(policy.stages) if policy.stages else None  # pre-LLM: every layer pruned
    pruned = counts[k:] if k is not None else counts
    cached = text_tokens + max(new_tokens - 1, 0)
    result.update(
        policy=policy.spec(),
        k=k,
        floor=None if k is None else floor_ratio(shape, k, text_tokens, new_tokens, convention, ffn),
        image_tokens=counts,
        retained=sum(pruned) / (len(pruned) * shape.n_img),
        kv_cache_bytes=kv_cache_bytes(shape, [img + cached for img in counts]),
        full_kv_cache_bytes=kv_cache_bytes(shape, [shape.n_img + cached] * shape.n_layers),
    )
    return result


__all__ = [
    "CONVENTIONS",
    "FFN_VARIANTS",
    "NAMED_SHAPES",
    "DecoderShape",
    "floor_ratio",
    "flops_ratio",
    "forward_flops",
    "generation_flops",
    "kv_cache_bytes",
    "request_bytes",
    "layer_flops",
    "policy_flops",
    "prefill_floor",
    "resolve_shape",
]
