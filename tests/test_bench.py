"""`dyrate bench`: structure and sanity of the measurements on a tiny model (no timing claims)."""

import json

import pytest

from dyrate.measure.bench import RANDOM_CONFIGS, bench, random_model
from dyrate.measure.shapes import make_inputs
from dyrate.cli import main
from dyrate.errors import InputError


def test_bench_rows(tiny):
    model, _ = tiny
    rows = bench(model, ["none", "fastv:k=2,r=0.75", "vtw:k=1"], [1, 2], new_tokens=4, text_tokens=10, repeats=1)
    assert [(r.policy, r.batch) for r in rows] == [
        (p, b) for b in (1, 2) for p in ("none", "fastv:k=2,r=0.75", "vtw:k=1")
    ]
    by = {(r.policy, r.batch): r for r in rows}
    for b in (1, 2):
        none, fastv, vtw = by["none", b], by["fastv:k=2,r=0.75", b], by["vtw:k=1", b]
        assert none.flops["prefill"]["ratio"] == 1.0 and none.retained == 1.0
        assert fastv.retained == pytest.approx(0.25) and vtw.retained == 0.0
        # the KV cache really shrinks: layers >= K hold 12 fewer image tokens (16 -> 4) per row
        assert none.peak_kv_bytes > fastv.peak_kv_bytes > vtw.peak_kv_bytes
        assert all(r.ttft_s > 0 and r.decode_tok_s > 0 and r.e2e_s >= r.ttft_s for r in (none, fastv, vtw))
    assert by["none", 2].peak_kv_bytes == 2 * by["none", 1].peak_kv_bytes


def test_bench_phases_show_a_shrinking_kept_set(tiny):
    """The per-phase KV bytes follow a progressive rate: constant for FastV, falling as tokens leave."""
    from dyrate.measure.bench import phase_bounds

    assert phase_bounds(12) == [(1, 3), (4, 6), (7, 9), (10, 12)]
    assert phase_bounds(2) == [(1, 1), (2, 2)]
    assert phase_bounds(13) == [(1, 3), (4, 6), (7, 9), (10, 13)]
    rows = bench(tiny[0], ["fastv:k=2,r=0.5", "progressive:k=2,0=0.5,4=0.75,10=0.9375"], [2], new_tokens=13,
                 text_tokens=10, repeats=1)
    fastv, prog = rows
    assert [p[:2] for p in prog.phases] == phase_bounds(12)
    assert all(ms > 0 for _, _, ms, _ in prog.phases)
    grow = [kv for *_, kv in fastv.phases]
    assert grow == sorted(grow) and grow[0] < grow[-1]  # one new entry per step and layer
    # 16 image tokens: 8 kept at prefill, 4 from step 4, 1 from step 10 (in layers >= 2)
    assert prog.phases[0][3] == fastv.phases[0][3]
    assert prog.phases[-1][3] < fastv.phases[-1][3]
    assert prog.retained < fastv.retained


def test_random_configs_are_shape_faithful():
    model = random_model("llava-1.5-7b", layers=1, device="meta")
    cfg = model.config.text_config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (4096, 11008, 32)
    assert cfg.num_hidden_layers == 1
    assert (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2 == 576
    with pytest.raises(InputError):
        random_model("llava-1.5-7b", layers=33, device="meta")
    assert {"medium", "llava-1.5-7b", "llava-1.5-13b", "qwen2.5-vl-7b", "llava-next-7b", "llava-onevision-7b"} <= set(RANDOM_CONFIGS)


@pytest.mark.parametrize("name,decoder,vision", [
    ("qwen2.5-vl-7b", (28, 3584, 18944, 28, 4, 152064), (32, 1280)),
    ("llava-next-7b", (32, 4096, 11008, 32, 32, 32064), (24, 1024)),
    ("llava-onevision-7b", (28, 3584, 18944, 28, 4, 152128), (26, 1152)),
])
def test_family_shapes_follow_the_published_configs(name, decoder, vision):
    """The named 7B shapes (built on the meta device: no memory) and their truncation."""
    from dyrate.measure.flops import NAMED_SHAPES

    model = random_model(name, device="meta")
    t, v = model.config.get_text_config(), model.config.vision_config
    assert (t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads,
            t.vocab_size) == decoder
    assert (getattr(v, "depth", None) or v.num_hidden_layers, v.hidden_size) == vision
    shape = NAMED_SHAPES[name]  # dyrate flops' shape of the same name agrees
    assert (shape.n_layers, shape.hidden, shape.ffn, shape.n_heads, shape.n_kv_heads) == decoder[:5]
    assert random_model(name, layers=2, vision_layers=1, device="meta").config.get_text_config().num_hidden_layers == 2


@pytest.mark.parametrize("family", ["llava-next", "llava-onevision", "qwen2.5-vl"])
def test_bench_on_every_family(family, tmp_path):
    """`bench` runs on each family's checkpoint with inputs in its layout; the image-token count follows
    the image side, and FastV's rows keep what they should."""
    import dyrate
    from dyrate.testbed.families import save_family

    from PIL import Image

    from dyrate.adapters.inputs import encode

    model, processor = dyrate.load(save_family(family, tmp_path / family))
    for side in (56, 112):  # the image-token count of the family's own processor for an image of that side
        real = encode(processor, [Image.new("RGB", (side, side), "red")], ["Hi"], "cpu")
        assert make_inputs(model, 1, 8, "cpu", image_side=side).n_img == int((real.input_ids == model.config.image_token_id).sum())
    rows = bench(model, ["none", "fastv:k=2,r=0.5"], [2], new_tokens=3, text_tokens=8, repeats=1, image_side=112)
    none, fastv = rows
    assert none.retained == 1.0 and fastv.retained == pytest.approx(0.5, abs=0.05)
    assert none.peak_kv_bytes > fastv.peak_kv_bytes


def test_cli_bench_json(tiny_dir, capsys):
    rc = main(["bench", "--model", str(tiny_dir), "--policies", "none;fastv:k=2,r=0.5", "--batch", "1",
               "--new-tokens", "3", "--repeats", "1", "--text-tokens", "8", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    payload = json.loads(out[-1])
    assert payload["conditions"]["image_tokens"] == 16
    assert [r["policy"] for r in payload["results"]] == ["none", "fastv:k=2,r=0.5"]
    assert [p["steps"] for p in payload["results"][0]["phases"]] == [[1, 1], [2, 2]]


@pytest.mark.parametrize("args", [
    ["--config", "medium"],  # no --random-weights
    ["--config", "medium", "--random-weights", "--batch", "0"],
    ["--config", "medium", "--random-weights", "--batch", "x"],
    ["--config", "medium", "--random-weights", "--policies", "fastv:k=99"],
    [],
])
def test_cli_bench_bad_input(args, capsys):
    assert main(["bench", *args]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("interleave,pope", [("workload", None), ("batch", "random,adversarial")])
def test_workload_time_script(tiny_dir, tmp_path, interleave, pope):
    """benchmarks/workload_time.py runs end to end on a tiny model and ends with its JSON line,
    with whole-workload or batch-by-batch turns, the captions' and questions' times apart (they add
    up to the whole), one POPE split or several."""
    import subprocess
    import sys
    from pathlib import Path

    from dyrate.testbed.data import write_dataset

    write_dataset(tmp_path / "data", seed=3, n=3, image_size=32, progress=False)
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "workload_time.py"
    run = subprocess.run([sys.executable, str(script), "--model", str(tiny_dir), "--data", str(tmp_path / "data"),
                          "--policies", "none;fastv:k=2,r=0.75", "--captions", "2", "--questions", "2",
                          "--batch-size", "2", "--repeats", "2", "--threads", "1", "--interleave", interleave,
                          *(["--pope", pope] if pope else [])],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    none, fastv = result["rows"]
    splits = pope.split(",") if pope else ["adversarial"]
    assert result["conditions"]["rows"] == {"captions": 2, "vqa": 2, **{f"pope_{s}": 2 for s in splits}}
    assert none["time_ratio"] == 1.0
    for row in (none, fastv):
        assert set(row["parts"]) == {"captions", "questions"}
        parts = [row["parts"]["captions"]["times_s"], row["parts"]["questions"]["times_s"]]
        assert [a + b for a, b in zip(*parts)] == pytest.approx(row["times_s"])
    assert result["conditions"]["interleave"] == interleave
    assert len(none["times_s"]) == 2 and fastv["kv_mean"] < none["kv_mean"] and fastv["retained"] == pytest.approx(0.25)
    assert none["paired_ratios"] == [1.0, 1.0]
    assert fastv["paired_ratios"] == pytest.approx([a / b for a, b in zip(fastv["times_s"], none["times_s"])])


@pytest.mark.parametrize("args", [["--pope", "adversarial,bogus"], ["--pope", "random,random"],
                                  ["--captions", "0", "--questions", "0"]])
def test_workload_time_bad_input(tmp_path, args):
    """Bad workload options are refused with one line, before any model loads."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "workload_time.py"
    run = subprocess.run([sys.executable, str(script), "--data", str(tmp_path), "--policies", "none", *args],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_pareto_time_kv_script(tmp_path):
    """benchmarks/pareto_time_kv.py pairs quality rows with timing rows by spec (several runs, modes
    labelled) and draws the figure; mismatched --table / --time counts are refused."""
    import subprocess
    import sys
    from pathlib import Path

    def table(rows):
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps({"rows": [{"policy": p, "min_rel": q} for p, q in rows]}))
        return str(path)

    def timing(mode, rows):
        path = tmp_path / f"w{len(list(tmp_path.iterdir()))}.json"
        path.write_text("progress\n" + json.dumps({"conditions": {"mode": mode, "threads": 2, "batch": 16}, "rows": [
            {"policy": p, "ms_per_row": ms, "kv_mean": kv} for p, ms, kv in rows]}))
        return str(path)

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "pareto_time_kv.py"
    args = ["--table", table([("none", 1.0), ("fastv:k=2,r=0.5", 0.99)]),
            "--time", timing("evict", [("none", 40.0, 2e6), ("fastv:k=2,r=0.5", 30.0, 1.4e6), ("untabled", 1, 1)]),
            "--table", table([("none", 1.0), ("dyrate:k=2,predictor=/x/p.safetensors,q=0.1", 0.98)]),
            "--time", timing("mask", [("none", 44.0, 2e6), ("dyrate:k=2,predictor=/x/p.safetensors,q=0.1", 46.0, 2e6)]),
            "--out", str(tmp_path / "fig.png")]
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "(4 policies)" in run.stdout  # none, fastv, none (mask), dyrate (mask); the untabled row is left out
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, str(script), *args[:6], "--out", str(tmp_path / "bad.png")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "as many --time" in bad.stderr


def test_gpu_script_runs_on_the_cpu_with_a_small_shape(tmp_path):
    """benchmarks/gpu.sh (the GPU engine table) runs end to end on the CPU with overrides, one JSON line
    per (batch, side), dyrate none equal to model.generate (the script checks it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PY": sys.executable, "CONFIGS": "medium", "LAYERS": "3", "BATCH": "1", "DEVICE": "cpu",
           "DTYPE": "float32", "NEW_TOKENS": "2", "REPEATS": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), str(tmp_path)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "engine_table.jsonl").read_text().splitlines()]
    sides = [r["side"] for r in rows]
    assert "model.generate (DynamicCache)" in sides and "dyrate none" in sides and "dyrate fastv:k=2,r=0.75" in sides
    fastv = next(r for r in rows if r["side"].startswith("dyrate fastv"))
    assert fastv["flops_ideal"] > 1 and fastv["ttft_s"] > 0 and all(r["kv_bytes"] > 0 for r in rows)
