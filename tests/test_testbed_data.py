"""`write_dataset`: files load with pycocotools / json, answers agree with the scene specs."""

import json

import pytest
from PIL import Image

from dyrate.testbed import language as L
from dyrate.testbed.data import read_jsonl, sample_example, write_dataset
from dyrate.testbed.scenes import Scene


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    counts = write_dataset(out, seed=3, n=12, image_size=96, progress=False)
    return out, counts


def test_files_load(dataset):
    from pycocotools.coco import COCO

    out, counts = dataset
    coco = COCO(str(out / "captions.json"))
    assert len(coco.getImgIds()) == 12
    assert len(coco.getAnnIds()) == 60 == counts["captions"]
    for img in coco.loadImgs(coco.getImgIds()):
        assert Image.open(out / "images" / img["file_name"]).size == (96, 96)
    vqa = read_jsonl(out / "vqa.jsonl")
    assert {"question_id", "image", "question", "answers", "type"} <= set(vqa[0])
    assert len({r["question_id"] for r in vqa}) == len(vqa)
    for split in L.POPE_SPLITS:
        rows = read_jsonl(out / f"pope_{split}.jsonl")
        assert {"question_id", "image", "text", "label"} <= set(rows[0])
        assert sum(r["label"] == "yes" for r in rows) * 2 == len(rows)


def test_answers_match_specs(dataset):
    out, _ = dataset
    scenes = {r["image"]: Scene.from_json({k: r[k] for k in ("seed", "background", "bg_tint", "objects")}) for r in read_jsonl(out / "scenes.jsonl")}
    for r in read_jsonl(out / "vqa.jsonl"):
        q = L.Question(r["type"], r["question"], r["answers"][0])
        assert L.answer(scenes[r["image"]], q) == r["answers"][0]
    for split in L.POPE_SPLITS:
        for r in read_jsonl(out / f"pope_{split}.jsonl"):
            assert L.answer(scenes[r["image"]], L.Question("pope", r["text"], r["label"])) == r["label"]
    coco = json.loads((out / "captions.json").read_text())
    names = {i["id"]: i["file_name"] for i in coco["images"]}
    for a in coco["annotations"]:
        assert L.parse_caption(a["caption"]) == L.scene_objects(scenes[names[a["image_id"]]])


def test_deterministic(dataset, tmp_path):
    out, _ = dataset
    write_dataset(tmp_path, seed=3, n=12, image_size=96, progress=False)
    for name in ("captions.json", "vqa.jsonl", "pope_adversarial.jsonl", "scenes.jsonl", "images/000005.png"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_training_stream_deterministic_and_mixed():
    exs = [sample_example(1000 + i) for i in range(200)]
    assert exs == [sample_example(1000 + i) for i in range(200)]
    tasks = {e.task for e in exs}
    assert tasks == {"caption", "qa", "pope"}


def test_task_weights_mixture():
    from dyrate.errors import InputError
    from dyrate.testbed.data import TASK_WEIGHTS, parse_task_weights

    assert [sample_example(5000 + i) for i in range(50)] == [sample_example(5000 + i, dict(TASK_WEIGHTS)) for i in range(50)]
    qa_only = parse_task_weights("caption=0,qa=1,pope=0")
    assert {sample_example(5000 + i, qa_only).task for i in range(50)} == {"qa"}
    with_dialog = parse_task_weights("caption=0,qa=0,pope=0,dialog=1")
    assert {sample_example(5000 + i, with_dialog).task for i in range(20)} == {"dialog"}
    # A zero dialog weight leaves the stream of the three-task mixture unchanged.
    zero = parse_task_weights("caption=0.4,qa=0.4,pope=0.2,dialog=0")
    assert [sample_example(5000 + i, zero) for i in range(50)] == [sample_example(5000 + i) for i in range(50)]
    for bad in ("caption=1,qa=1", "caption=x,qa=1,pope=1", "caption=-1,qa=1,pope=1", "caption=0,qa=0,pope=0",
                "caption=1,qa=1,pope=1,chat=1", "qa=1,pope=1,dialog=1"):
        with pytest.raises(InputError, match="--task-weights"):
            parse_task_weights(bad)


def test_dialog_turns_are_correct_and_need_binding():
    from dyrate.testbed.data import binding_negatives, parse_task_weights

    weights = parse_task_weights("caption=0,qa=0,pope=0,dialog=1")
    n_hard = 0
    for i in range(60):
        ex = sample_example(7000 + i, weights)
        assert ex == sample_example(7000 + i, weights)
        turns = [(ex.question, ex.answer), *ex.more]
        qa = [(q, a) for q, a in turns if not q.startswith("is there")]
        pope = [(q, a) for q, a in turns if q.startswith("is there")]
        assert sorted(a for _, a in pope) == ["no", "yes"]
        assert len(qa) >= 4  # colour, count, shape, size always apply; position when nameable
        for q, a in pope:
            assert L.answer(ex.scene, L.Question("pope", q, a)) == a
        for q, a in qa:
            qtype = next(t for t, head in (("colour", "what colour"), ("count", "how many"), ("position", "where"),
                                           ("shape", "which shape"), ("size", "is the")) if q.startswith(head))
            assert L.answer(ex.scene, L.Question(qtype, q, a)) == a
        hard = binding_negatives(ex.scene)
        colours, shapes = {o.colour for o in ex.scene.objects}, {o.shape for o in ex.scene.objects}
        assert all(c in colours and s in shapes and (c, s) not in {o.category for o in ex.scene.objects} for c, s in hard)
        if hard:
            n_hard += 1
            (neg,) = [q for q, a in pope if a == "no"]
            assert any(L.pope_question(*c) == neg for c in hard)
    assert n_hard > 10
