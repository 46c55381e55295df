"""lmms-eval plugin (`dyrate_llava`) and the testbed tasks, run offline on the tiny checkpoint.

Skipped when lmms-eval is not installed (pip install -e ".[lmms]")."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    import lmms_eval.evaluator  # noqa: F401
except ImportError as err:
    pytest.skip(f"lmms-eval is not installed ({err}); pip install -e '.[lmms]'", allow_module_level=True)
except RuntimeError as err:  # e.g. a torchvision wheel whose compiled ops do not match this torch
    pytest.skip(f"lmms-eval is installed but cannot be imported: {err}", allow_module_level=True)

from lmms_eval.api.instance import Instance  # noqa: E402

import dyrate  # noqa: E402
from dyrate.errors import InputError  # noqa: E402
from dyrate.integrations.lmms import TASKS_DIR, DyrateLlava, cut_at, policy_from_arg  # noqa: E402

POLICY = "fastv:k=2,r=0.5"
QUESTIONS = ["what colour is the square?", "how many objects are there?", "where is the circle?"]
POPE = [("is there a red square in the image?", "yes"), ("is there a cat in the image?", "no"),
        ("is there a blue circle in the image?", "yes")]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, images):
    """Testbed-format files (vqa.jsonl, pope_random.jsonl, images/) with the `images` fixture's pictures."""
    out = tmp_path_factory.mktemp("testbed")
    (out / "images").mkdir()
    vqa, pope = [], []
    for i, img in enumerate(images):
        img.save(out / "images" / f"{i:06d}.png")
        vqa.append({"question_id": 10 * i, "image": f"{i:06d}.png", "question": QUESTIONS[i], "answers": ["red"], "type": "colour"})
        pope.append({"question_id": 10 * i, "image": f"{i:06d}.png", "text": POPE[i][0], "label": POPE[i][1]})
    for name, rows in (("vqa.jsonl", vqa), ("pope_random.jsonl", pope)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture()
def offline_env(monkeypatch, data_dir, tmp_path):
    monkeypatch.setenv("DYRATE_TESTBED_DATA", str(data_dir))
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)


def test_entry_point_resolves():
    from lmms_eval.models import get_model

    assert get_model("dyrate_llava") is DyrateLlava


def test_policy_args(tiny_dir):
    assert policy_from_arg("fastv:k=2|r=0.5") == POLICY
    assert policy_from_arg("fastv:k=2;r=0.5") == POLICY
    assert policy_from_arg('"fastv:k=2,r=0.5"') == POLICY
    assert policy_from_arg("schedule:2=0.5|3=0.75") == "schedule:2=0.5,3=0.75"
    with pytest.raises(InputError, match="';' or '\\|'"):  # what `policy=fastv:k=2,r=0.5` unquoted turns into
        DyrateLlava.create_from_arg_string(f"pretrained={tiny_dir},policy=fastv:k=2,r=0.5")
    with pytest.raises(InputError, match="needs policy=dyrate"):
        DyrateLlava(pretrained=str(tiny_dir), predictor="pred.safetensors")
    lm = DyrateLlava.create_from_arg_string(f"pretrained={tiny_dir},policy=fastv:k=2|r=0.5,mode=mask", {"device": "cpu"})
    assert lm.policy.spec() == POLICY and lm.mode == "mask"


def test_predictor_arg(tiny_dir, tmp_path):
    """predictor=FILE completes a dyrate / dyrate-rnn spec (the engine then checks the file)."""
    from dyrate.api import load
    from dyrate.learn.predictors import new_predictor, save_predictor

    model, _ = load(tiny_dir)
    path = save_predictor(new_predictor("mlp", k=2, model=model), tmp_path / "mlp.safetensors")
    lm = DyrateLlava(pretrained=str(tiny_dir), policy="dyrate:k=2", predictor=str(path), device="cpu")
    assert lm.policy.spec().startswith("dyrate:k=2") and "mlp.safetensors" in lm.policy.spec()
    lm = DyrateLlava(pretrained=str(tiny_dir), policy="dyrate", predictor=str(path), device="cpu")
    assert "mlp.safetensors" in lm.policy.spec()


def test_gen_kwargs():
    assert cut_at("yes. no\nmore", ["\n", "."]) == "yes"
    assert cut_at("abc", []) == "abc"
    opts = DyrateLlava._options
    fake = type("F", (), {"max_new_tokens": 7, "seed": 3})()
    assert opts(fake, {}) == ([], 7, {})
    assert opts(fake, {"until": "\n", "max_new_tokens": 4, "temperature": 0, "do_sample": True}) == (["\n"], 4, {})
    assert opts(fake, {"temperature": 0.5, "top_p": 0.9}) == ([], 7, {"do_sample": True, "temperature": 0.5, "top_p": 0.9, "seed": 3})
    assert opts(fake, {"num_beams": 3}) == ([], 7, {"num_beams": 3})


def test_simple_evaluate_matches_generate(tiny_dir, data_dir, images, offline_env, tmp_path):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    stats = tmp_path / "stats.jsonl"
    tm = TaskManager("WARNING", include_path=str(TASKS_DIR), include_defaults=False)
    assert {"dyrate_testbed_vqa", "dyrate_testbed_pope_random"} <= set(tm.all_tasks)
    res = simple_evaluate(
        model="dyrate_llava",
        model_args=f"pretrained={tiny_dir},policy=fastv:k=2|r=0.5,mode=evict,stats_path={stats}",
        tasks=["dyrate_testbed_vqa", "dyrate_testbed_pope_random"],
        task_manager=tm, device="cpu", batch_size=2, log_samples=True, verbosity="WARNING",
        bootstrap_iters=0,
    )
    vqa, pope = res["results"]["dyrate_testbed_vqa"], res["results"]["dyrate_testbed_pope_random"]
    assert 0.0 <= vqa["vqa_accuracy,none"] <= 1.0 and 0.0 <= vqa["exact_match,none"] <= 1.0
    for key in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1", "pope_yes_ratio"):
        assert 0.0 <= pope[f"{key},none"] <= 1.0
    assert res["config"]["model"] == "dyrate_llava"

    # the same inputs through dyrate.generate: same texts (task max_new_tokens: vqa 10, pope 5)
    model, processor = dyrate.load(tiny_dir)
    expected = {
        "dyrate_testbed_vqa": dyrate.generate(model, processor, images, QUESTIONS, policy=POLICY, max_new_tokens=10),
        "dyrate_testbed_pope_random": dyrate.generate(model, processor, images, [q for q, _ in POPE], policy=POLICY, max_new_tokens=5),
    }
    logged = [json.loads(line) for line in stats.read_text().splitlines()]
    assert len(logged) == 6
    for task, outs in expected.items():
        samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == [0, 1, 2]
        assert [s["filtered_resps"][0] for s in samples] == [o.text for o in outs]
        by_doc = {s["doc_id"]: s for s in logged if s["task"] == task}
        for i, o in enumerate(outs):
            assert by_doc[i]["prediction"] == o.text and by_doc[i]["n_tokens"] == len(o.token_ids)
            assert by_doc[i]["retained"] == pytest.approx(o.retained)
            assert by_doc[i]["flops"]["prefill"] == pytest.approx(o.flops["prefill"]["ratio"])
            assert by_doc[i]["policy"] == POLICY and by_doc[i]["mode"] == "evict"
    assert all(s["flops"]["prefill"] < 1.0 for s in logged)  # FastV pruned something


def _requests(images, contexts, continuations):
    docs = [{"i": i} for i in range(len(contexts))]
    reqs = [
        Instance("loglikelihood", (c, cont, lambda d: [images[d["i"]]], i, "t", "test"), idx=0,
                 metadata={"task": "t", "doc_id": i, "repeats": 1})
        for i, (c, cont) in enumerate(zip(contexts, continuations))
    ]  # fmt: skip
    return docs, reqs


def plain_logprob(model, processor, image, context: str, continuation: str) -> float:
    """Log-probability of `continuation` after the templated context, from one plain forward pass.
    image: one image or a list (a multi-image prompt)."""
    row = image if isinstance(image, list) else [image]
    prompt = dyrate.api.build_prompt(processor, context, n_images=len(row))
    batch = processor(images=[row], text=[prompt + continuation], return_tensors="pt")
    n = len(processor(images=[row], text=[prompt], return_tensors="pt")["input_ids"][0])
    with torch.inference_mode():
        logits = model(**batch).logits[0].float().log_softmax(-1)
    ids = batch["input_ids"][0]
    return sum(float(logits[j - 1, ids[j]]) for j in range(n, len(ids)))


def test_loglikelihood(tiny_dir, images):
    torch.set_num_threads(1)
    model, processor = dyrate.load(tiny_dir)
    contexts = QUESTIONS[:2]
    # greedy continuations under the policy: log-likelihood must call them greedy
    outs = dyrate.generate(model, processor, images[:2], contexts, policy=POLICY, max_new_tokens=4)
    conts = [processor.tokenizer.decode(o.token_ids[:4]) for o in outs]
    assert all(len(c) == 4 for c in conts)

    pruned = DyrateLlava(pretrained=str(tiny_dir), policy="fastv:k=2|r=0.5", device="cpu")
    docs, reqs = _requests(images, contexts, conts)
    pruned.task_dict = {"t": {"test": docs}}
    got = pruned.loglikelihood(reqs)
    assert [g for _, g in got] == [True, True]
    assert all(lp < 0 for lp, _ in got)

    # no pruning: equal to a plain forward pass of the model over context + continuation
    full = DyrateLlava(pretrained=str(tiny_dir), policy="none", device="cpu")
    full.task_dict = {"t": {"test": docs}}
    for (lp, _), ctx, cont, img in zip(full.loglikelihood(reqs), contexts, conts, images):
        ref = plain_logprob(model, processor, img, ctx, cont)
        assert lp == pytest.approx(ref, abs=1e-4)
    assert [lp for lp, _ in got] != pytest.approx([lp for lp, _ in full.loglikelihood(reqs)])


def test_two_processes_equal_one(tiny_dir, data_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): every document once, the same outputs as 1 process."""
    import glob
    import shutil
    import socket
    import subprocess
    import sys

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate launcher not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DYRATE_TESTBED_DATA": str(data_dir), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = ["-m", "lmms_eval", "--model", "dyrate_llava", "--model_args", f"pretrained={tiny_dir},policy=fastv:k=2|r=0.5",
            "--tasks", "dyrate_testbed_vqa", "--include_path", str(TASKS_DIR), "--device", "cpu", "--batch_size", "1",
            "--log_samples", "--verbosity", "WARNING"]
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
              "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    outputs = {}
    for name, cmd in (("one", [sys.executable]), ("two", launch)):
        run = subprocess.run(cmd + args + ["--output_path", str(tmp_path / name)], env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        [path] = glob.glob(str(tmp_path / name / "*" / "*samples_dyrate_testbed_vqa.jsonl"))
        rows = [json.loads(line) for line in open(path)]
        outputs[name] = sorted((r["doc_id"], r["filtered_resps"]) for r in rows)
    assert [d for d, _ in outputs["one"]] == [0, 1, 2]  # every document once
    assert outputs["two"] == outputs["one"]


@pytest.mark.parametrize("family", ["llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl"])
def test_other_families(family, images, tmp_path):
    """The plugin loads every supported family: generation equals dyrate.generate, and with pruning
    off the log-likelihood equals a plain forward pass of the model over context + continuation."""
    from dyrate.testbed.families import save_family

    torch.set_num_threads(1)
    path = save_family(family, tmp_path / family)
    model, processor = dyrate.load(path)
    contexts = QUESTIONS[:2]
    want = [o.text for o in dyrate.generate(model, processor, images[:2], contexts, policy=POLICY, max_new_tokens=4)]
    lm = DyrateLlava(pretrained=str(path), policy="fastv:k=2|r=0.5", device="cpu")
    docs = [{"i": i} for i in range(2)]
    lm.task_dict = {"t": {"test": docs}}
    gen = [Instance("generate_until", (c, {"max_new_tokens": 4, "until": []}, lambda d: [images[d["i"]]], i, "t", "test"),
                    idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, c in enumerate(contexts)]
    assert [r.text for r in lm.generate_until(gen)] == want

    full = DyrateLlava(pretrained=str(path), policy="none", device="cpu")
    full.task_dict = {"t": {"test": docs}}
    _, reqs = _requests(images, contexts, ["abc", "de"])
    for (lp, _), ctx, cont, img in zip(full.loglikelihood(reqs), contexts, ["abc", "de"], images):
        ref = plain_logprob(model, processor, img, ctx, cont)
        assert lp == pytest.approx(ref, abs=1e-4), family


def test_multi_image_requests(tiny_dir, images):
    """A request with several visuals is a multi-image prompt: generation equals dyrate.generate on the
    same images, log-likelihood equals a plain forward pass; a request without a visual is one line."""
    torch.set_num_threads(1)
    model, processor = dyrate.load(tiny_dir)
    lm = DyrateLlava(pretrained=str(tiny_dir), policy="fastv:k=2|r=0.5", device="cpu")
    docs = [{"i": 0}, {"i": 1}]
    lm.task_dict = {"t": {"test": docs}}
    pair = lambda d: [images[d["i"]], images[2]]  # noqa: E731
    gen = [Instance("generate_until", (QUESTIONS[i], {"max_new_tokens": 4, "until": []}, pair, i, "t", "test"),
                    idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i in range(2)]
    want = dyrate.generate(model, processor, [[images[0], images[2]], [images[1], images[2]]], QUESTIONS[:2],
                           policy=POLICY, max_new_tokens=4, template=True)
    assert [r.text for r in lm.generate_until(gen)] == [w.text for w in want]

    full = DyrateLlava(pretrained=str(tiny_dir), policy="none", device="cpu")
    full.task_dict = {"t": {"test": docs}}
    req = Instance("loglikelihood", (QUESTIONS[0], "ab", pair, 0, "t", "test"), idx=0,
                   metadata={"task": "t", "doc_id": 0, "repeats": 1})
    [(lp, _)] = full.loglikelihood([req])
    assert lp == pytest.approx(plain_logprob(model, processor, [images[0], images[2]], QUESTIONS[0], "ab"), abs=1e-4)

    none = Instance("generate_until", (QUESTIONS[0], {"max_new_tokens": 2}, lambda d: [], 0, "t", "test"), idx=0,
                    metadata={"task": "t", "doc_id": 0, "repeats": 1})
    with pytest.raises(InputError, match="at least one image"):
        lm.generate_until([none])
