"""The testbed: a small LLaVA-architecture model trained here on procedural scenes.

Modules:
  scenes      scene specs (seeded), rendering, per-patch labels
  language    captions, short-answer and POPE questions, caption parser, object F1
  data        training example stream and held-out evaluation files
  processing  word-level tokenizer, CLIP image processor, LlavaProcessor, chat template
  configs     named LlavaConfig sizes ("tiny", "base")
  train       training loop, resumable checkpoints, HF export
  evaluate    caption F1 / CIDEr, short-answer accuracy, POPE with greedy generate
  cli         `dyrate testbed data|train|eval`
"""
