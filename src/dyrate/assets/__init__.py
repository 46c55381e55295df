"""The files that ship inside the package: the built-in testbed model and its DyRate predictors (the
default of every command and of `dyrate.load()`). This is the one place that knows where they lie.

Layout, under `dyrate/assets/testbed/`: an ordinary HF checkpoint directory (config, fp16
safetensors, tokenizer, processor, `testbed.json`), `quality.json` (the held-out figures recorded
in docs/testbed.md, which a test re-checks on a few scenes) and `predictors/` (DyRate rate
predictors trained for this model: `mlp.safetensors`, `gru.safetensors`, the defaults of `dyrate`
and `dyrate-rnn` (progressive eviction: hidden state + step, prefill ranking, shrinking labels, with
their chosen settings q / cap / every stored in the file); `mlp-hidden-prefill.safetensors`,
`gru-hidden-prefill.safetensors`, the per-token variants of docs/dyrate.md, for mask mode with `q=`;
`gru-hidden-prefill-kl0.001.safetensors`, the per-token GRU with stricter labels chosen on the
validation set, e.g. with `q=0.15`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

ASSET_DIR = Path(__file__).resolve().parent / "testbed"


def model_dir() -> Path:
    """The shipped checkpoint directory; CheckpointError if this install lacks it."""
    if not (ASSET_DIR / "config.json").is_file():
        raise CheckpointError(f"the built-in testbed model is missing ({ASSET_DIR}); reinstall dyrate or give --model DIR")
    return ASSET_DIR


def predictor_path(arch: str = "mlp", variant: str = "") -> Path:
    """A shipped DyRate predictor file for the shipped model ('mlp' or 'gru'; variant '' for the
    default, 'hidden-prefill' or 'hidden-prefill-kl0.001' for the per-token ones)."""
    path = ASSET_DIR / "predictors" / (f"{arch}-{variant}.safetensors" if variant else f"{arch}.safetensors")
    if not path.is_file():
        raise CheckpointError(f"no shipped {arch!r} predictor ({path}); train one with `dyrate train-predictor`")
    return path
