"""The learned rate (DyRate): predictors and how they are trained.

  predictors  the rate predictors (MLP on the share vector, GRU over the last N), their features
              and their file format (safetensors + metadata, with the model fingerprint)
  soft_mask   the mask bank and the differentiable soft rank mask of training
  samples     `Sample` (image, prompt, answer): how training data comes in; teacher responses
  teacher     the teacher-forced pass (cached once per sequence) and the soft-masked layers >= K
  objective   Gumbel-Softmax, the fit and compute terms of the loss
  oracle      oracle bin labels (per step, or one per prompt)
  config      `TrainConfig`
  train       the training loop, resumable training state

Nothing here reads datasets or knows the testbed; the policies `dyrate` / `dyrate-rnn` use
`predictors` at inference.
"""

from .config import OBJECTIVES, TrainConfig
from .predictors import RatePredictor, load_predictor, new_predictor, save_predictor
from .samples import Sample
from .train import build_cache, train

__all__ = ["OBJECTIVES", "RatePredictor", "Sample", "TrainConfig", "build_cache", "load_predictor", "new_predictor",
           "save_predictor", "train"]
