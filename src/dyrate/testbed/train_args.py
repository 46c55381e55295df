"""The settings of a testbed training run (`TrainArgs`, validated before any work) and the LR schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from .configs import get_spec
from .data import parse_task_weights

STATE_DIR = "train_state"  # under OUT: the resumable training state


@dataclass
class TrainArgs:
    config: str = "base"
    out: str = "runs/testbed"
    steps: int | None = None  # total optimizer steps (over all resumed invocations)
    minutes: float | None = None  # total training wall time (over all resumed invocations)
    seed: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    vision_lr_mult: float = 2.0  # the tower learns from scratch through a long path: give it more
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_frac: float = 0.1
    aux_weight: float = 0.5
    proj_aux_weight: float = 0.5  # per-patch loss on the projector output, with the grid cell
    loc_aux_weight: float = 0.0  # per-patch loss on the projector output: the patch's own 3x3 cell (all patches)
    init: str | None = None  # start from the weights of another run (OUT of an earlier train)
    drop_prob: float = 0.0  # image-token dropout: fraction of examples that get it (see sample_dropout)
    drop_max_rate: float = 0.9  # ... and the largest fraction of image tokens hidden
    drop_background_first: float = 0.0  # ... and the fraction of those that hide background patches first
    task_weights: str | None = None  # e.g. "caption=0.2,qa=0.5,pope=0.3" (default: data.TASK_WEIGHTS)
    attn_sup_weight: float = 0.0  # attention supervision (see attention_supervision_loss), 0 = off
    attn_sup_layers: tuple[int, ...] = (2, 3)  # ... the decoder layers whose head 0 it supervises
    attn_sup_sink: bool = False  # ... and questions naming no present object should look at bos
    attn_sup_count: bool = False  # ... and count questions split it evenly over bos and each counted object
    query_aux_weight: float = 0.0  # per-question loss: the question's attributes, read off its last prompt token
    salience_weight: float = 0.0  # per-turn loss: every head of --salience-layer looks at the objects (see salience_loss)
    salience_layer: int = 1  # ... the decoder layer (1 = the layer FastV ranks by at K=2)
    bf16: bool | None = None  # bf16 autocast; None: only where the CPU has native bf16 (else it is ~20x slower)
    save_every_s: float = 300.0
    log_every: int = 10
    progress: bool = True
    stop_after_steps: int | None = None  # end this invocation early (tests; time-sliced runs)

    def validate(self) -> None:
        get_spec(self.config)
        floats = {k: v for k, v in vars(self).items() if isinstance(v, float)}
        bad = [f"{k}={v}" for k, v in floats.items() if not math.isfinite(v)]
        if bad:
            raise InputError(f"need finite numbers, got {', '.join(bad)}")
        if self.steps is None and self.minutes is None:
            raise InputError("give --steps, --minutes or both (training stops at whichever comes first)")
        if self.steps is not None and self.steps <= 0:
            raise InputError(f"--steps must be positive, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise InputError(f"--minutes must be positive, got {self.minutes}")
        if self.batch_size <= 0:
            raise InputError(f"--batch-size must be positive, got {self.batch_size}")
        if self.lr <= 0:
            raise InputError(f"--lr must be positive, got {self.lr}")
        if min(self.aux_weight, self.proj_aux_weight, self.loc_aux_weight) < 0:
            raise InputError("--aux-weight, --proj-aux-weight and --loc-aux-weight must be >= 0, got "
                             f"{self.aux_weight}, {self.proj_aux_weight}, {self.loc_aux_weight}")
        if not 0 <= self.drop_prob <= 1 or not 0 <= self.drop_max_rate < 1 or not 0 <= self.drop_background_first <= 1:
            raise InputError(
                f"--drop-prob and --drop-background-first must lie in [0, 1] and --drop-max-rate in [0, 1), "
                f"got {self.drop_prob}, {self.drop_background_first}, {self.drop_max_rate}"
            )
        if self.task_weights is not None:
            parse_task_weights(self.task_weights)
        if self.attn_sup_weight < 0 or self.query_aux_weight < 0:
            raise InputError(f"--attn-sup-weight and --query-aux-weight must be >= 0, got {self.attn_sup_weight}, {self.query_aux_weight}")
        n_layers = get_spec(self.config).text_layers
        if max(self.attn_sup_weight, self.query_aux_weight) > 0 and (not self.attn_sup_layers or any(not 0 <= i < n_layers for i in self.attn_sup_layers)):
            raise InputError(f"--attn-sup-layers {list(self.attn_sup_layers)}: give decoder layers in 0..{n_layers - 1}")
        if self.salience_weight < 0:
            raise InputError(f"--salience-weight must be >= 0, got {self.salience_weight}")
        if self.salience_weight > 0 and not 0 <= self.salience_layer < n_layers:
            raise InputError(f"--salience-layer {self.salience_layer}: give a decoder layer in 0..{n_layers - 1}")
        if (self.attn_sup_sink or self.attn_sup_count) and self.attn_sup_weight == 0:
            raise InputError("--attn-sup-sink and --attn-sup-count shape the attention supervision: give --attn-sup-weight > 0 too")
        if self.init is not None and not any((Path(self.init) / f).is_file() for f in (f"{STATE_DIR}/model.safetensors", "config.json")):
            raise InputError(f"--init {self.init}: neither a training state ({STATE_DIR}/model.safetensors) nor a checkpoint "
                             "(config.json) there (give the --out of an earlier run or an exported model)")

    def use_bf16(self) -> bool:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported() if self.bf16 is None else self.bf16

def lr_factor(step: int, progress: float, args: TrainArgs) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from 1 to `min_lr_frac` over progress
    in [0, 1] (the fraction of --steps or --minutes used, whichever is further along)."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.min_lr_frac + (1 - args.min_lr_frac) * cos
