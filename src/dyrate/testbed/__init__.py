"""The testbed: a small LLaVA-architecture model trained here on procedural scenes.

Modules:
  scenes      scene specs (seeded), rendering, per-patch labels
  language    captions, short-answer and POPE questions, caption parser, object F1
  data        training example stream and held-out evaluation files
  processing  word-level tokenizer, CLIP image processor, LlavaProcessor, chat template
  configs     named LlavaConfig sizes ("tiny", "base")
  train_args  the settings of a training run, the LR schedule
  batches     deterministic training batches, image-token dropout
  losses      the hand-run forward pass, auxiliary heads, attention losses
  checkpoints resumable training state, warm starts, HF export
  train       the training loop
  evaluate    caption F1 / CIDEr, short-answer accuracy, POPE with greedy generate
  scoring     object F1 of captions against scene truth (`evaluation.CaptionTruth` for testbed data)

The `dyrate testbed data|train|eval` commands live in `dyrate.cli.testbed`.
"""
