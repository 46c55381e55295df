"""Offline tokenizer and processor of the testbed model.

A word-level `tokenizers` model (every word of the testbed's closed vocabulary is one token,
punctuation split off and glued back by the decoder) wrapped in `PreTrainedTokenizerFast`, plus
a `CLIPImageProcessorPil` (the PIL backend; no torchvision needed), combined in a `LlavaProcessor` with a LLaVA-1.5-style chat template:

    <s>a chat between a user and an assistant that describes simple scenes.
    USER: <image>
    how many objects are there? ASSISTANT: three</s>

so the four token groups of the design exist: sys (bos .. 'user :'), img (the image tokens),
ins (the question and 'assistant :'), res (the answer).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from . import language as L
from .scenes import BACKGROUNDS, COLOUR_NAMES, POSITIONS, SHAPES, SIZES

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)
SYSTEM_PROMPT = "a chat between a user and an assistant that describes simple scenes."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A LLaVA-1.5-style template. A system message replaces the default system line; images of a
# user turn come first, then its text; an assistant turn ends with eos.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + SYSTEM_PROMPT + "') -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- endfor -%}"
    "{{- ns.system + '\\n' -}}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}{%- else -%}{{- ' ASSISTANT: ' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
)

# Words that appear outside generated scene text (chat template, prompts, generic words).
_EXTRA_WORDS = (
    "user assistant image images object objects shape shapes colour color size position where what which "
    "how many is are there a an the of in at on and or with to yes no none nothing small large describe "
    "list scene detail simple chat between that describes background".split()
)
_PUNCTUATION = tuple(",.:;?!'\"()-")


def vocabulary() -> list[str]:
    """The closed word list, in a fixed order: special tokens, then sorted words."""
    words = set(_EXTRA_WORDS) | set(_PUNCTUATION)
    words |= set(COLOUR_NAMES) | set(SHAPES) | set(L.PLURALS.values()) | set(SIZES) | set(POSITIONS)
    words |= set(L.NUMBERS) | set(L.BACKGROUND_WORDS.values()) | set(BACKGROUNDS)
    texts = [SYSTEM_PROMPT, *L.CAPTION_PROMPTS.values()]
    # Every template word, from a few scenes covering all styles and question types.
    from .scenes import sample_scene

    for seed in range(400):
        scene = sample_scene(seed)
        texts += L.captions(scene)
        texts += [q.question + " " + q.answer for q in L.short_questions(scene)]
        texts += [q for split in L.POPE_SPLITS for q, _ in L.pope_questions(scene, split)]
    for t in texts:
        words |= set(L.words_of(t))
    return list(SPECIAL_TOKENS) + sorted(words - set(SPECIAL_TOKENS))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer: lower-cases, splits at whitespace and punctuation ('top-left'
    stays one word), adds bos, and decodes 'a , b :' back to 'a, b:'."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[a-z]+(?:-[a-z]+)*|[^\sa-z]"), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=True), decoders.Replace(" :", ":")])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",  # for batched generation; training pads by hand
        model_max_length=1024,
    )
    return fast


def build_processor(image_size: int, patch_size: int) -> LlavaProcessor:
    """LlavaProcessor for a model with square `image_size` inputs and `patch_size` patches.
    The CLIP tower adds a CLS token which the 'default' feature strategy drops, so one
    '<image>' expands to (image_size // patch_size) ** 2 tokens."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )


def build_prompt(question: str, answer: str | None = None, system: str = SYSTEM_PROMPT) -> str:
    """The chat-template text for one image and one question (what `apply_chat_template`
    gives with add_generation_prompt=True), optionally followed by the answer and eos."""
    text = f"{system}\nUSER: {IMAGE}\n{question} ASSISTANT:"
    return text if answer is None else f"{text} {answer}{EOS}"


def messages(question: str) -> list[dict]:
    """The chat messages of one image + one question, for `processor.apply_chat_template`."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def pixel_values(images: list[Image.Image], image_size: int) -> torch.Tensor:
    """Fast path of the CLIP image processor for images already `image_size` square:
    (B, 3, S, S) float32, normalised with the CLIP mean and std (tests check equality)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # (B, S, S, 3)
    if arr.shape[1:3] != (image_size, image_size):
        raise ValueError(f"expected {image_size}x{image_size} images, got {arr.shape[1:3]}")
    arr = (arr / 255.0 - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)
