"""Evaluation harness of `dyrate eval`: datasets (COCO captions, VQA and POPE JSONL), metrics,
a resumable, data-parallel runner over rows x policies, and its reports.

    from dyrate.evaluation import EvalConfig, prepare, run_eval
    plan = prepare(EvalConfig(task="pope", data="pope_random.jsonl", policies=["none", "vtw:k=2"], out="runs/pope"))
    summary = run_eval(model, processor, plan)

See docs/eval.md.
"""

from .datasets import DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_NEW_TOKENS, TASKS, CaptionTruth, Dataset, Row, load_dataset
from .report import markdown, pareto_plot, write_reports
from .runner import EvalConfig, Plan, parse_policies, prepare, run_eval
from .score import summarize
from .store import merge_samples, read_all, read_samples, shard_path, shard_rows

__all__ = [
    "CaptionTruth",
    "DEFAULT_CAPTION_PROMPT",
    "DEFAULT_MAX_NEW_TOKENS",
    "Dataset",
    "EvalConfig",
    "Plan",
    "Row",
    "TASKS",
    "load_dataset",
    "markdown",
    "merge_samples",
    "pareto_plot",
    "parse_policies",
    "prepare",
    "read_all",
    "read_samples",
    "run_eval",
    "shard_path",
    "shard_rows",
    "summarize",
    "write_reports",
]
