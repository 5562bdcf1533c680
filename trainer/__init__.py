"""rosetrainer's trainer: a from-scratch GPT, its data and sampler, and a resumable training loop.

Entry point: `python trainer/train.py` or `torchrun ... trainer/train.py` (see docs/trainer.md).
"""
