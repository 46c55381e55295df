"""Tokenizer / processor: closed vocabulary, chat template, image-token expansion, save/load."""

import pytest
import torch

from dyrate.testbed import language as L
from dyrate.testbed.processing import IMAGE, build_processor, build_prompt, messages, pixel_values
from dyrate.testbed.scenes import render, sample_scene

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_processor():
    return build_processor(32, 8)


def test_vocabulary_covers_all_text(tiny_processor):
    tok = tiny_processor.tokenizer
    for seed in range(100, 160):
        s = sample_scene(seed)
        texts = L.captions(s) + [q.question + " " + q.answer for q in L.short_questions(s)]
        texts += [q for sp in L.POPE_SPLITS for q, _ in L.pope_questions(s, sp)]
        for t in texts:
            ids = tok(t, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, t
            assert tok.decode(ids) == t  # decoding restores the exact string


def test_chat_template_and_groups(tiny_processor):
    q = "how many objects are there?"
    text = tiny_processor.apply_chat_template(messages(q), add_generation_prompt=True)
    assert text == build_prompt(q)
    image = render(sample_scene(1), 32)
    ids = tiny_processor(images=[image], text=[text], return_tensors="pt")["input_ids"][0]
    is_img = ids == tiny_processor.image_token_id
    assert int(is_img.sum()) == 16  # (32 / 8) ** 2, CLS dropped by the 'default' strategy
    first, last = int(is_img.nonzero()[0]), int(is_img.nonzero()[-1])
    assert last - first + 1 == 16
    assert ids[0] == tiny_processor.tokenizer.bos_token_id
    assert first > 3 and len(ids) - last - 1 > 3  # sys and ins groups are non-empty


def test_fast_pixel_path_matches_processor(tiny_processor):
    images = [render(sample_scene(s), 32) for s in range(3)]
    ref = tiny_processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixel_values(images, 32), ref, atol=1e-5)


def test_save_load_round_trip(tiny_processor, tmp_path):
    from transformers import AutoProcessor

    tiny_processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    image = render(sample_scene(2), 32)
    text = build_prompt("where is the red circle?")
    a = tiny_processor(images=[image], text=[text], return_tensors="pt")
    b = loaded(images=[image], text=[text], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.allclose(a["pixel_values"], b["pixel_values"])
    assert loaded.apply_chat_template(messages("hi"), add_generation_prompt=True) == build_prompt("hi")
    assert loaded.tokenizer.convert_tokens_to_ids(IMAGE) == tiny_processor.image_token_id


def test_base_processor_expands_to_144_tokens():
    proc = build_processor(96, 8)
    out = proc(images=[render(sample_scene(0), 96)], text=[build_prompt("describe the image.")])
    assert out["input_ids"][0].count(proc.image_token_id) == 144
