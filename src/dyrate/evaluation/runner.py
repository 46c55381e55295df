"""The evaluation runner: rows x policies through `dyrate.generate`, samples to JSONL as it goes,
then one scoring pass and the reports.

    from dyrate.evaluation import EvalConfig, prepare, run_eval
    config = EvalConfig(task="vqa", data="data/vqa.jsonl", policies=["none", "fastv:k=2,r=0.5"], out="runs/eval")
    plan = prepare(config)                     # checks data and policies, no model needed
    summary = run_eval(model, processor, plan) # resumes whatever config.out already holds

Data parallel: under `accelerate launch`, every process calls `run_eval` with the same plan; it
takes every world_size-th row, writes samples.rank{r}.jsonl, and the main process merges and
scores after all are done (the other processes return None).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, TextIO

from ..errors import InputError
from .datasets import DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_NEW_TOKENS, TASKS, CaptionTruth, Dataset, Row, load_dataset
from .score import CONVENTIONS, summarize
from .run_dir import RunLock, check_writable, file_digest, read_run_file, write_run_file
from .store import SAMPLES, SampleWriter, has_prediction, merge_samples, read_all, shard_path, shard_rows

LOG_FILE = "eval.log"
MAX_STDERR_PROBLEMS = 20  # more go to eval.log only


@dataclass
class EvalConfig:
    """What to evaluate. `max_new_tokens=None` takes the task's default (caption 64, vqa 10, pope 5)."""

    task: str
    data: str | Path
    policies: str | list[str]  # specs, or one string separated by ';'
    out: str | Path
    images: str | Path | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    mode: str = "evict"
    prompt: str = DEFAULT_CAPTION_PROMPT  # caption instruction
    suffix: str = ""  # appended to VQA / POPE questions, e.g. "Answer with one word."
    progress: bool = True
    model_name: str = ""  # recorded in run.json / summary (a path, or "builtin")
    decoding: dict[str, Any] = field(default_factory=dict)  # generate options (num_beams, do_sample, top_p, seed, ...); {} = greedy
    truth: CaptionTruth | None = None  # captions: extra per-image truth and its metrics (e.g. testbed object F1)

    def __post_init__(self):
        if self.task not in TASKS:
            raise InputError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        if self.max_new_tokens is None:
            self.max_new_tokens = DEFAULT_MAX_NEW_TOKENS[self.task]
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        from ..engine import GenerationOptions

        allowed = set(GenerationOptions.__dataclass_fields__) - {"max_new_tokens"}  # that one is a field here
        unknown = set(self.decoding) - allowed
        if unknown:
            raise InputError(f"unknown decoding option(s): {', '.join(sorted(unknown))}")
        GenerationOptions(max_new_tokens=self.max_new_tokens, **self.decoding)  # bad values fail before any work
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")
        if self.mode not in ("evict", "mask"):
            raise InputError(f"mode must be 'evict' or 'mask', got {self.mode!r}")
        self.out = Path(self.out)

    def prompt_for(self, row: Row) -> str:
        if self.task == "caption":
            return self.prompt
        return f"{row.question} {self.suffix}".strip() if self.suffix else row.question

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the samples."""
        d = {
            "task": self.task,
            "data": str(Path(self.data).resolve()),
            "images": None if self.images is None else str(Path(self.images).resolve()),
            "model": self.model_name,
            "mode": self.mode,
            "max_new_tokens": self.max_new_tokens,
        }
        if self.decoding:
            d["decoding"] = dict(sorted(self.decoding.items()))
        if self.task == "caption":
            d["prompt"] = self.prompt
        else:
            d["suffix"] = self.suffix
        return d


@dataclass
class Plan:
    config: EvalConfig
    dataset: Dataset
    policies: list[str]  # canonical specs, in the order given, duplicates removed

    @property
    def rows(self) -> list[Row]:
        return self.dataset.rows

    def order(self) -> list[tuple[str, str]]:
        return [(r.key, p) for r in self.rows for p in self.policies]


def parse_policies(specs: str | list[str]) -> list[str]:
    """'none;fastv:k=2,r=0.5' or a list -> canonical spec strings (PolicySpecError on a bad one)."""
    from ..policies import parse_policy

    if isinstance(specs, str):
        specs = specs.split(";")
    out: list[str] = []
    for s in specs:
        if s.strip():
            spec = parse_policy(s.strip()).spec()
            if spec not in out:
                out.append(spec)
    if not out:
        raise InputError("no policy given (e.g. --policies 'none;fastv:k=2,r=0.5')")
    return out


def prepare(config: EvalConfig) -> Plan:
    """Check the policies and read the dataset (no model). Raises InputError / PolicySpecError."""
    policies = parse_policies(config.policies)
    dataset = load_dataset(config.task, config.data, config.images, config.limit, config.truth)
    return Plan(config, dataset, policies)


# ---------------------------------------------------------------- running


@dataclass
class _Log:
    out: Path
    stream: TextIO | None
    is_main: bool
    shown: int = 0
    lines: list[str] = field(default_factory=list)

    def problem(self, msg: str) -> None:
        if not self.is_main:
            return
        self.lines.append(msg)
        if self.stream is not None:
            if self.shown < MAX_STDERR_PROBLEMS:
                print(f"dyrate eval: {msg}", file=self.stream)
            elif self.shown == MAX_STDERR_PROBLEMS:
                print(f"dyrate eval: ... more problems in {self.out / LOG_FILE}", file=self.stream)
            self.shown += 1
        with (self.out / LOG_FILE).open("a", encoding="utf-8") as f:
            f.write(msg + "\n")


def run_eval(
    model,
    processor,
    plan: Plan,
    state=None,
    log: TextIO | None | str = "stderr",
    on_batch: Callable[[int, int], None] | None = None,
) -> dict | None:
    """Generate every (row, policy) pair of `plan` not yet in `plan.config.out`, then (main process)
    merge, score and write samples.jsonl, summary.json, summary.md and pareto.png.

    state: an `accelerate.PartialState` (or anything with num_processes, process_index,
    is_main_process, wait_for_everyone()); None runs single-process.
    log: where problems (skipped rows, per-row errors) are printed besides OUT/eval.log ("stderr":
    sys.stderr at call time; None: the log file only).
    on_batch(batch_index, pairs_done_so_far) is called after each batch is flushed (test hook).
    Returns the summary dict on the main process, None on the others."""

    config = plan.config
    if log == "stderr":
        log = sys.stderr
    world = getattr(state, "num_processes", 1) if state is not None else 1
    process = getattr(state, "process_index", 0) if state is not None else 0
    is_main = process == 0
    check_writable(config.out)
    _check_size(model, processor, plan)  # before OUT is touched
    config.out.mkdir(parents=True, exist_ok=True)
    identity = {**config.identity(), "data_sha256": file_digest(plan.dataset.path),
                "truth_sha256": file_digest(plan.dataset.truth_file)}
    # The main process takes OUT's lock and checks run.json; every process learns its verdict
    # before anyone writes a sample (docs/eval.md, "Resume").
    lock, problem, everything = RunLock(config.out), None, plan
    if is_main:
        problem = lock.acquire()
        if problem is None:
            try:
                earlier = read_run_file(config.out, identity)
                # the summary covers every policy run into OUT, the earlier ones first
                everything = replace(plan, policies=earlier + [p for p in plan.policies if p not in earlier])
                write_run_file(config.out, identity, everything.policies)
            except InputError as err:
                problem = str(err)
    problem = _agree(state, problem)
    if problem is not None:
        lock.release()
        raise InputError(problem)
    try:
        _generate_all(model, processor, plan, state, _Log(config.out, log, is_main), on_batch)
        if not is_main:
            return None
        samples = merge_samples(config.out, everything.order())
        summary = summarize(everything, samples)
        summary["processes"] = world
        from .report import write_reports

        write_reports(config.out, summary)
        return summary
    finally:
        lock.release()


def _check_size(model, processor, plan: Plan) -> None:
    """Refuse (InputError) a run whose batches would not fit in memory, before the first one: the
    first row's prompt length (plus a margin for longer questions) x batch size x beams."""
    from ..adapters.inputs import encode
    from ..api import check_request
    from ..errors import DyrateError

    config, row = plan.config, plan.rows[0]
    try:
        n_prompt = encode(processor, [row.image], [config.prompt_for(row)], "cpu").n_prompt
    except DyrateError:
        return  # that row reports its own problem when its turn comes
    beams = int(config.decoding.get("num_beams", 1))
    check_request(model, config.batch_size, n_prompt + 64 + config.max_new_tokens, beams)


def _agree(state, problem: str | None) -> str | None:
    """The main process's verdict, on every process (torch.distributed broadcast when it runs;
    otherwise each process has only its own)."""
    if state is None or getattr(state, "num_processes", 1) <= 1:
        return problem
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return problem
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _generate_all(model, processor, plan: Plan, state, logger: "_Log", on_batch) -> None:
    """Generate this process's share of the (row, policy) pairs that have no prediction in OUT yet."""
    from ..adapters.inputs import read_image
    from ..api import generate
    from ..errors import DyrateError

    config = plan.config
    world = getattr(state, "num_processes", 1) if state is not None else 1
    process = getattr(state, "process_index", 0) if state is not None else 0
    is_main = process == 0
    if is_main:
        for msg in plan.dataset.bad:
            logger.problem(f"skipped row: {msg}")

    done = {key for key, sample in read_all(config.out).items() if has_prediction(sample)}  # read before anyone writes
    _barrier(state)
    my_rows = shard_rows(plan.rows, process, world)
    todo = [(row, [p for p in plan.policies if (row.key, p) not in done]) for row in my_rows]
    todo = [(row, pols) for row, pols in todo if pols]
    total = sum(len(p) for _, p in todo)
    target = shard_path(config.out, process) if world > 1 else config.out / SAMPLES

    from tqdm import tqdm

    bar = tqdm(
        total=total,
        desc=f"eval {config.task} [process {process}]" if world > 1 else f"eval {config.task}",
        unit="gen",
        disable=not (config.progress and is_main) or total == 0,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    n_done = 0
    from ..policies import parse_policy

    built = {p: parse_policy(p) for p in plan.policies}  # once per run: a predictor file is read once, not per batch
    if todo:
        _warm_up(generate, model, processor, todo[0][0], config, DyrateError)
    with SampleWriter(target) as writer:
        for b, start in enumerate(range(0, len(todo), config.batch_size)):
            batch = todo[start : start + config.batch_size]
            images: dict[str, Any] = {}
            for row, pols in batch:
                try:
                    images[row.key] = read_image(row.image)
                except DyrateError as err:
                    logger.problem(f"row {row.id!r}: {err}")
                    for p in pols:
                        writer.write(_error_sample(row, p, config.mode, str(err)))
                    n_done += len(pols)
                    bar.update(len(pols))
            for policy in plan.policies:
                rows = [row for row, pols in batch if policy in pols and row.key in images]
                if not rows:
                    continue
                for row, sample in _generate_rows(
                    generate, model, processor, rows, images, policy, config, DyrateError, built[policy]
                ):
                    if sample.get("error"):
                        logger.problem(f"row {row.id!r}, policy {policy}: {sample['error']}")
                    writer.write(sample)
                writer.flush()
                n_done += len(rows)
                bar.update(len(rows))
            writer.flush()
            if on_batch is not None:
                on_batch(b, n_done)
    bar.close()
    _barrier(state)


def _warm_up(generate, model, processor, row: Row, config: EvalConfig, error_type) -> None:
    """One short untimed call, so the first batch's latency is not the one-off start-up cost."""
    from ..adapters.inputs import read_image

    try:
        generate(model, processor, [read_image(row.image)], [config.prompt_for(row)], max_new_tokens=1)
    except error_type:
        pass  # the row itself reports its problem later


def _barrier(state) -> None:
    if state is not None and getattr(state, "num_processes", 1) > 1:
        state.wait_for_everyone()


def _generate_rows(generate, model, processor, rows, images, policy, config, error_type, built=None):
    """[(row, sample)] for one policy (its spec; `built`: the Policy object, if parsed already) over
    some rows: one batched call; if it fails on bad input, row by row so that only the offending rows
    get an error sample."""
    try:
        t0 = time.perf_counter()
        results = generate(
            model,
            processor,
            [images[r.key] for r in rows],
            [config.prompt_for(r) for r in rows],
            policy=built if built is not None else policy,
            mode=config.mode,
            max_new_tokens=config.max_new_tokens,
            **config.decoding,
        )
        latency = (time.perf_counter() - t0) / len(rows)
        return [(r, _sample(r, policy, config.mode, res, latency)) for r, res in zip(rows, results)]
    except error_type as err:
        if len(rows) == 1:
            return [(rows[0], _error_sample(rows[0], policy, config.mode, str(err)))]
    out = []
    for r in rows:
        out += _generate_rows(generate, model, processor, [r], images, policy, config, error_type, built)
    return out


def _sample(row: Row, policy: str, mode: str, res, latency: float) -> dict:
    return {
        "id": row.id,
        "policy": policy,
        "mode": mode,
        "prediction": res.text,
        "n_tokens": len(res.token_ids),
        "retained": res.retained,
        "kv_bytes": res.kv_bytes,
        "flops": {c: {k: res.flops[c][k] for k in ("ratio", "flops", "full_flops")} for c in CONVENTIONS},
        "latency_s": latency,
        "error": None,
    }


def _error_sample(row: Row, policy: str, mode: str, error: str) -> dict:
    return {"id": row.id, "policy": policy, "mode": mode, "prediction": None, "error": error}
