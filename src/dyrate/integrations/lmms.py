"""lmms-eval plugin: run any lmms-eval task through dyrate's pruning engine.

    pip install -e ".[lmms]"
    python -m lmms_eval --model dyrate_llava \
        --model_args "pretrained=CKPT,policy=fastv:k=2|r=0.5,mode=evict" --tasks TASK --device cpu

The model `dyrate_llava` is registered through the `lmms_eval.models` entry point (see
`manifests`). lmms-eval splits `--model_args` on commas, so the parameters of a policy are written
with ';' or '|' between them (`fastv:k=2;r=0.5`, `schedule:4=0.5|8=0.75`); a quoted spec
(`policy="fastv:k=2,r=0.5"`) works too. docs/lmms.md has the details.

This module imports lmms-eval at import time; `import dyrate` never imports it.
"""

from __future__ import annotations

import json
import os
import time
from statistics import fmean
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    from lmms_eval.api.instance import GenerationResult as LmmsGenerationResult
    from lmms_eval.api.instance import TokenCounts
    from lmms_eval.api.model import lmms
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"dyrate.integrations.lmms needs lmms-eval: pip install 'dyrate[lmms]' ({err})") from err

from loguru import logger

from ..adapters import adapter_for
from ..adapters.inputs import IMAGE_PLACEHOLDER, build_prompt, encode, read_image
from ..api import generate, load
from ..engine import Engine, forced_logprobs
from ..errors import InputError
from ..measure import flops as flops_model
from ..policies import parse_policy

MODEL_ID = "dyrate_llava"
TASKS_DIR = Path(__file__).with_name("lmms_tasks")  # pass as --include_path for the testbed tasks
GEN_KEYS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams", "length_penalty")


def manifests():
    """Entry point of the `lmms_eval.models` group: the models this package adds to lmms-eval."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path="dyrate.integrations.lmms.DyrateLlava")]


def policy_from_arg(value: Any) -> str:
    """A policy spec as written in --model_args -> the spec dyrate parses: surrounding quotes are
    dropped and ';' or '|' between parameters become ','."""
    spec = str(value).strip()
    if len(spec) >= 2 and spec[0] == spec[-1] and spec[0] in "\"'":
        spec = spec[1:-1].strip()
    return spec.replace(";", ",").replace("|", ",")


def _dtype(value: Any):
    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return value
    dt = getattr(torch, str(value), None)
    if not isinstance(dt, torch.dtype):
        raise InputError(f"dtype {value!r} is not a torch dtype (float32, float16, bfloat16 or auto)")
    return dt


@dataclass
class SampleStats:
    """What pruning did for one request (kept on `DyrateLlava.stats`, written to `stats_path`)."""

    task: str
    doc_id: Any
    kind: str  # generate_until | loglikelihood
    policy: str
    mode: str
    prediction: str | None = None  # generated text after cutting at `until`
    n_tokens: int = 0  # tokens generated (or teacher-forced)
    retained: float | None = None  # image tokens attended, mean over pruned layers and steps
    flops: dict[str, float] = field(default_factory=dict)  # ratio vs unpruned, per convention
    latency_s: float = 0.0


class DyrateLlava(lmms):
    """A local LLaVA checkpoint run by dyrate's engine under a pruning policy.

    model_args: pretrained (checkpoint directory; default: the shipped testbed model), policy (spec,
    default none), mode (evict|mask), predictor (predictor file of policy=dyrate / dyrate-rnn), device, dtype, batch_size,
    max_new_tokens (used when a task sets none), seed (for sampling tasks), stats_path (JSONL of
    per-sample pruning stats)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        policy: str = "none",
        mode: str = "evict",
        predictor: str | None = None,
        device: str | None = None,
        dtype: str | None = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int = 32,
        seed: int | None = None,
        stats_path: str | None = None,
        max_batch_size: int | None = None,  # passed by lmms-eval's simple_evaluate; unused
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            names = ", ".join(sorted(unknown))
            raise InputError(
                f"dyrate_llava: unknown model_args {names}. lmms-eval splits --model_args on commas: "
                "separate a policy's parameters with ';' or '|' (policy=fastv:k=2|r=0.5)"
            )
        spec = policy_from_arg(policy)
        if predictor:  # the learned policies take their predictor file as a spec parameter
            if spec.partition(":")[0].strip().lower() not in ("dyrate", "dyrate-rnn"):
                raise InputError(
                    f"dyrate_llava: predictor={predictor!r} needs policy=dyrate or policy=dyrate-rnn, got {spec!r}"
                )
            spec = f"{spec}{',' if ':' in spec else ':'}predictor={predictor}"
        self.policy = parse_policy(spec)
        self.mode = str(mode)
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"dyrate_llava: device {device!r} requested but CUDA is not available (use device=cpu)")
        self._device = self._join_processes(device)
        if not str(batch_size).isdigit():
            logger.warning(f"dyrate_llava: batch_size {batch_size!r} is not an integer; using 1")
            batch_size = 1
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise InputError(f"dyrate_llava: batch_size must be >= 1, got {batch_size!r}")
        self.max_new_tokens = int(max_new_tokens)
        self.seed = None if seed is None else int(seed)
        self.stats_path = Path(stats_path) if stats_path else None
        self.pretrained = str(pretrained) if pretrained else "builtin"

        self._model, self.processor = load(pretrained or None, dtype=_dtype(dtype), device=str(self._device))
        self.adapter = adapter_for(self._model)
        self.engine = Engine(self.adapter, self.policy, self.mode)  # validates the policy and the mode
        self.shape = flops_model.DecoderShape.from_config(self._model.config)
        self.stats: list[SampleStats] = []
        logger.info(f"dyrate_llava: {self.pretrained} policy={self.policy.spec()} mode={self.mode} on {self._device}")

    def _join_processes(self, device: str | None) -> torch.device:
        """Under `accelerate launch` / torchrun (WORLD_SIZE > 1): join the process group (gloo on
        CPUs) through an `Accelerator`, which lmms-eval's evaluator then uses for its barriers, and
        report this process's rank and the world size: the evaluator gives each rank every
        world_size-th document and gathers the results on rank 0. Returns the device to run on
        (each process its own GPU unless a device is given)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        on_cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
        if world <= 1:
            return torch.device(device or ("cpu" if on_cpu else "cuda"))
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=on_cpu)
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if device is None and not on_cpu:
            return torch.device(f"cuda:{self.accelerator.local_process_index}")
        return torch.device(device or "cpu")

    # ------------------------------------------------------------------ lmms-eval plumbing
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def config(self):
        return self._model.config

    def _doc(self, task: str, split: str, doc_id):
        return self.task_dict[task][split][doc_id]

    def _image(self, doc_to_visual, task: str, split: str, doc_id):
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        flat = []
        for v in visuals:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        if not flat:
            raise InputError(f"dyrate_llava needs at least one image per request; {task} doc {doc_id} has none")
        return [read_image(v) for v in flat]  # the request's images (a multi-image prompt when several)

    @staticmethod
    def _context(context: str) -> str:
        """The task's text, without image placeholders (the chat template puts the images first)."""
        return context.replace(IMAGE_PLACEHOLDER, "").strip() or " "

    def _record(self, stat: SampleStats) -> None:
        self.stats.append(stat)
        if self.stats_path is not None:
            self.stats_path.parent.mkdir(parents=True, exist_ok=True)
            with self.stats_path.open("a") as f:
                f.write(json.dumps(stat.__dict__, default=str) + "\n")

    # ------------------------------------------------------------------ generation
    def _options(self, gen_kwargs: dict) -> tuple[list[str], int, dict]:
        """lmms-eval gen_kwargs -> (until strings, max_new_tokens, dyrate.generate options)."""
        unknown = set(gen_kwargs) - set(GEN_KEYS)
        if unknown:
            logger.debug(f"dyrate_llava ignores gen_kwargs {sorted(unknown)}")
        until = gen_kwargs.get("until")
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)):
            raise InputError(f"gen_kwargs 'until' must be a string or a list, got {type(until).__name__}")
        max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs["do_sample"]) if gen_kwargs.get("do_sample") is not None else temperature > 0
        opts: dict[str, Any] = {}
        if do_sample and temperature > 0:  # temperature 0 means greedy, whatever do_sample says
            opts.update(do_sample=True, temperature=temperature)
            if gen_kwargs.get("top_p") is not None:
                opts["top_p"] = float(gen_kwargs["top_p"])
            if gen_kwargs.get("top_k") is not None:
                opts["top_k"] = int(gen_kwargs["top_k"])
            if self.seed is not None:
                opts["seed"] = self.seed
        elif int(gen_kwargs.get("num_beams") or 1) > 1:
            opts["num_beams"] = int(gen_kwargs["num_beams"])
            if gen_kwargs.get("length_penalty") is not None:
                opts["length_penalty"] = float(gen_kwargs["length_penalty"])
        return [u for u in until if u], max_new, opts

    def _prompt_tokens(self, images, prompts) -> int:
        """The longest prompt of a batch in tokens (image tokens included), as generate() will see it."""
        return encode(self.processor, images, prompts, "cpu", template=True).n_prompt

    def generate_until(self, requests) -> list:
        args = [req.args for req in requests]
        results: list[Any] = [None] * len(args)
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs, *_rest) in enumerate(args):
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for i, res in zip(chunk, self._generate_chunk([args[i] for i in chunk])):
                    results[i] = res
        done = [s for s in self.stats[-len(args):] if s.kind == "generate_until"] if args else []
        if done:
            logger.info(
                f"dyrate_llava: {len(done)} generations, policy {self.policy.spec()} ({self.mode}): retained "
                f"{fmean(s.retained for s in done):.3f}, FLOPs ratio prefill {fmean(s.flops['prefill'] for s in done):.3f}, "
                f"cached {fmean(s.flops['cached'] for s in done):.3f}"
            )
        return results

    def _generate_chunk(self, chunk) -> list:
        contexts, gen_kwargs = [c[0] for c in chunk], dict(chunk[0][1] or {})
        until, max_new, opts = self._options(gen_kwargs)
        images = [self._image(dv, task, split, doc_id) for _, _, dv, doc_id, task, split in chunk]
        prompts = [self._context(c) for c in contexts]
        room = self.adapter.max_positions - self._prompt_tokens(images, prompts)
        if room < 1:
            raise InputError(f"dyrate_llava: a prompt fills the model's {self.adapter.max_positions} positions")
        if max_new > room:
            logger.warning(f"dyrate_llava: max_new_tokens {max_new} cut to {room} (the model's positions)")
            max_new = room
        t0 = time.perf_counter()
        outs = generate(
            self._model, self.processor, images, prompts, policy=self.policy, mode=self.mode,
            max_new_tokens=max_new, template=True, **opts,
        )
        latency = (time.perf_counter() - t0) / len(chunk)
        results = []
        for (_, _, _, doc_id, task, _split), out in zip(chunk, outs):
            text = cut_at(out.text, until)
            self._record(SampleStats(
                task, doc_id, "generate_until", out.policy, out.mode, prediction=text,
                n_tokens=len(out.token_ids), retained=out.retained,
                flops={conv: v["ratio"] for conv, v in out.flops.items()}, latency_s=latency,
            ))
            results.append(LmmsGenerationResult(text, TokenCounts(output_tokens=len(out.token_ids))))
        return results

    def generate_until_multi_round(self, requests) -> list:
        raise NotImplementedError("dyrate_llava does not implement multi-round generation")

    # ------------------------------------------------------------------ log-likelihood
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of the continuation after the context (chat template applied to
        the context, the continuation appended verbatim), teacher-forced through the engine under the
        policy: the prefill prunes as in generation, and each continuation token is one decode step.
        Also whether every continuation token is the greedy choice."""
        out = []
        for context, target, doc_to_visual, doc_id, task, split in (req.args for req in requests):
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            images = self._image(doc_to_visual, task, split, doc_id)
            t0 = time.perf_counter()
            logprob, greedy, n = self._continuation_logprob(images, self._context(context), continuation)
            self._record(SampleStats(task, doc_id, "loglikelihood", self.policy.spec(), self.mode,
                                     n_tokens=n, latency_s=time.perf_counter() - t0))
            out.append((logprob, greedy))
        return out

    @torch.inference_mode()
    def _continuation_logprob(self, images: list, context: str, continuation: str) -> tuple[float, bool, int]:
        prompt = build_prompt(self.processor, context, template=True, n_images=len(images))
        ctx = encode(self.processor, [images], [context], self._device, texts=[prompt])
        full = encode(self.processor, [images], [context], self._device, texts=[prompt + continuation])
        ctx_ids, full_ids = ctx.input_ids[0], full.input_ids[0]
        # tokens shared with the context's tokenization are context; the rest is the continuation
        n = min(len(ctx_ids), len(full_ids))
        common = int((ctx_ids[:n] != full_ids[:n]).nonzero()[0]) if bool((ctx_ids[:n] != full_ids[:n]).any()) else n
        common = max(common, 1)
        cont = full_ids[common:]
        if len(cont) == 0:
            return 0.0, True, 0
        if common + len(cont) > self.adapter.max_positions:
            raise InputError(f"dyrate_llava: context + continuation exceed the model's {self.adapter.max_positions} positions")
        ids = full_ids[None, :common]
        logp = forced_logprobs(self.engine, ids, torch.ones_like(ids), full.vision, cont)  # (T, V)
        total = float(logp.gather(1, cont[:, None]).sum())
        greedy = bool((logp.argmax(-1) == cont).all())
        return total, greedy, len(cont)


def cut_at(text: str, until) -> str:
    """The text up to the first occurrence of any stop string."""
    for stop in until or []:
        if stop:
            text = text.split(stop, 1)[0]
    return text

