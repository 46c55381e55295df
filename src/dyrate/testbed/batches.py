"""Training batches of the testbed: deterministic from seed and step (scene -> example -> token ids,
labels on response tokens, per-patch targets, question targets), and the training-time image-token dropout."""

from __future__ import annotations

import math

import torch

from .configs import get_spec
from .data import sample_example
from .language import PLURALS, named_objects, question_type, words_of
from .processing import EOS, IMAGE, pixel_values
from .scenes import COLOUR_NAMES, POSITIONS, SHAPES, SIZES, patch_labels, render
from .train_args import TrainArgs


def question_targets(question: str) -> list[int]:
    """The attributes a question names, as the aux heads' targets: (shape, colour, size, position),
    each 0 if the question names none, else 1 + index (plural shapes count as the shape)."""
    words = words_of(question)

    def first(names, alias=None) -> int:
        for w in words:
            w = (alias or {}).get(w, w)
            if w in names:
                return names.index(w) + 1
        return 0

    return [first(SHAPES, {p: s for s, p in PLURALS.items()}), first(COLOUR_NAMES), first(SIZES), first(POSITIONS)]

def patch_cells(num_patches: int) -> torch.Tensor:
    """(P,) int64: the 3x3 grid cell (row-major, as POSITIONS) of each patch of a square grid of
    P patches in row-major order."""
    g = math.isqrt(num_patches)
    idx = torch.arange(num_patches)
    return (idx // g) * 3 // g * 3 + (idx % g) * 3 // g

class BatchBuilder:
    """Turns examples into padded tensors: ids = bos sys 'user :' <image>*N question
    'assistant :' answer eos [then, for a dialog, 'user :' question 'assistant :' answer eos per
    later turn, as the chat template writes a conversation]; labels are -100 except on answers
    and their eos. Also the queries of the question losses: for every question turn (not
    captions) its last prompt token, the attributes the question names (`question_targets`) and
    the patches of the objects it names (`language.named_objects`; none for an absent POPE
    category or a count of zero); and for the salience loss the last prompt token of every turn,
    captions included (t_rows, t_pos)."""

    def __init__(self, processor, config_name: str, task_weights: dict[str, float] | None = None):
        self.spec = get_spec(config_name)
        self.task_weights = task_weights
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids(IMAGE)
        self.eos_id = self.tok.convert_tokens_to_ids(EOS)
        self.pad_id = self.tok.pad_token_id
        system, rest = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}], add_generation_prompt=True).split(IMAGE)
        # ids before the image (with bos) and the words between question and answer.
        self.head_ids = self.tok(system)["input_ids"]
        self.tail_ids = self.tok(rest.replace("Q", "", 1), add_special_tokens=False)["input_ids"]  # 'assistant :'
        self.user_ids = self.tok(system.split("\n")[-1], add_special_tokens=False)["input_ids"]  # 'user :'

    def encode(self, question: str, answer: str, more: tuple[tuple[str, str], ...] = ()) -> tuple[list[int], list[int], list[int]]:
        """-> (ids, labels, the index of each turn's last prompt token)."""
        ids = self.head_ids + [self.image_id] * self.spec.num_image_tokens
        labels = [-100] * len(ids)
        ends = []
        for k, (question_, answer_) in enumerate(((question, answer), *more)):
            q = (self.user_ids if k else []) + self.tok(question_, add_special_tokens=False)["input_ids"] + self.tail_ids
            a = self.tok(answer_, add_special_tokens=False)["input_ids"] + [self.eos_id]
            ids += q
            ends.append(len(ids) - 1)
            ids += a
            labels += [-100] * len(q) + a
        return ids, labels, ends

    def build(self, scene_seeds: list[int]) -> dict[str, torch.Tensor]:
        ids, labels, images, targets = [], [], [], []
        q_rows, q_pos, q_targets, q_mask, q_count = [], [], [], [], []
        t_rows, t_pos = [], []
        for b, s in enumerate(scene_seeds):
            ex = sample_example(s, self.task_weights)
            image, label_map = render(ex.scene, self.spec.image_size, with_labels=True)
            i, l, ends = self.encode(ex.question, ex.answer, ex.more)
            ids.append(i)
            labels.append(l)
            images.append(image)
            targets.append(torch.from_numpy(patch_labels(ex.scene, label_map, self.spec.patch_size)))
            for (question, _), end in zip(((ex.question, ex.answer), *ex.more), ends):
                t_rows.append(b)
                t_pos.append(end)
                if question_type(question) is None:  # a caption prompt
                    continue
                cells = [o.cell + 1 for o in named_objects(ex.scene, question)]
                q_rows.append(b)
                q_pos.append(end)
                q_targets.append(question_targets(question))
                q_mask.append(torch.isin(targets[-1][:, 3], torch.tensor(cells, dtype=torch.long)))  # (P,) named objects' patches
                q_count.append(question_type(question) == "count")
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)  # right padding
        label_t = torch.full((len(ids), width), -100, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for b, (i, l) in enumerate(zip(ids, labels)):
            input_ids[b, : len(i)] = torch.tensor(i)
            label_t[b, : len(l)] = torch.tensor(l)
            mask[b, : len(i)] = 1
        return {
            "input_ids": input_ids,  # (B, T)
            "attention_mask": mask,  # (B, T)
            "labels": label_t,  # (B, T)
            "pixel_values": pixel_values(images, self.spec.image_size),  # (B, 3, S, S)
            "patch_targets": torch.stack(targets),  # (B, P, 4)
            "q_rows": torch.tensor(q_rows, dtype=torch.long),  # (M,) example of each question turn
            "q_pos": torch.tensor(q_pos, dtype=torch.long),  # (M,) its last prompt token
            "q_targets": torch.tensor(q_targets, dtype=torch.long).view(-1, 4),  # (M, 4) see question_targets
            "q_mask": torch.stack(q_mask) if q_mask else torch.zeros(0, len(targets[0]), dtype=torch.bool),  # (M, P)
            "q_count": torch.tensor(q_count, dtype=torch.bool),  # (M,) count questions
            "t_rows": torch.tensor(t_rows, dtype=torch.long),  # (K,) example of every turn, captions included
            "t_pos": torch.tensor(t_pos, dtype=torch.long),  # (K,) its last prompt token
        }

def sample_dropout(input_ids, image_token_id: int, n_layers: int, args: "TrainArgs", step: int, background=None):
    """Image-token dropout for one batch, a pure function of (seed, step): each example with
    probability `drop_prob` hides a uniform fraction in [0, drop_max_rate) of its image tokens
    from a random layer in 1..n_layers-1 on. Which tokens: uniformly random ones, or, for a
    fraction `drop_background_first` of those examples, background patches first (random among
    them; objects only once the background is used up), as a pruner that keeps the informative
    tokens would. background: (B, P) bool, True where no object covers the patch (needed for the
    second kind). Returns (start (B,), hidden_cols (B, T) bool) or None."""
    if args.drop_prob <= 0:
        return None
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    b = input_ids.shape[0]
    on = torch.rand(b, generator=gen) < args.drop_prob  # (B,)
    rate = torch.rand(b, generator=gen) * args.drop_max_rate  # (B,)
    start = torch.randint(1, n_layers, (b,), generator=gen)  # (B,) in 1..L-1
    is_image = (input_ids == image_token_id).cpu()  # (B, T)
    u = torch.rand(is_image.shape, generator=gen)  # (B, T)
    hidden_cols = u < rate[:, None]  # uniformly random kind
    structured = torch.rand(b, generator=gen) < args.drop_background_first  # (B,)
    if background is not None and bool(structured.any()):
        is_object = torch.zeros_like(is_image)
        is_object[is_image] = ~background.cpu().flatten()  # image columns in patch order (P per row)
        key = u + 2.0 * is_object.float() + 4.0 * (~is_image).float()  # background first, then objects
        rank = torch.empty_like(u, dtype=torch.long).scatter_(
            1, key.argsort(1), torch.arange(u.shape[1]).expand(b, -1).contiguous()
        )  # (B, T) position of each column in that order
        n_hide = (rate * is_image.sum(1)).round().long()  # (B,)
        hidden_cols = torch.where(structured[:, None], rank < n_hide[:, None], hidden_cols)
    hidden_cols &= is_image & on[:, None]
    return start.to(input_ids.device), hidden_cols.to(input_ids.device)
