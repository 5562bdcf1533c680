"""Model presets, the training configuration, and the trainer's command-line parser.

Nothing here imports torch: a bad flag is reported before anything heavy is loaded and long
before any process group exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from runcontract import env
from runcontract.cli import flag, option


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag and the value."""


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the GPT. `vocab_size` comes from the data, the rest from a preset."""

    vocab_size: int = 256
    """Number of distinct tokens (256 for byte-level text)."""
    block_size: int = 256
    """Longest sequence the model can attend over (its context length)."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide `n_embd`."""
    n_embd: int = 256
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention weights and residual branches."""
    bias: bool = True
    """Whether linear layers and LayerNorms carry a bias."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")


# Shapes only; the vocabulary size is filled in from the data and dropout from the flag.
PRESETS: dict[str, dict[str, int]] = {
    # About 0.12M parameters: fast enough for tests that start several processes.
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
    # About 3.2M parameters: the default demo, sized so the default run fits a 2-core CPU.
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256},
    # GPT-2 124M shape (with a byte-level vocabulary it has ~86M parameters): for a GPU.
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
}


def model_config(preset: str, vocab_size: int, dropout: float) -> GPTConfig:
    """Return the `GPTConfig` of a named preset with the given vocabulary and dropout.

    Raises ConfigError for an unknown preset name.
    """
    if preset not in PRESETS:
        raise ConfigError(f"--model: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    shape = PRESETS[preset]
    return GPTConfig(
        vocab_size=vocab_size,
        block_size=shape["block_size"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        dropout=dropout,
    )


def default_data_cache() -> str:
    """Where the embedded corpus is cached: $ROSE_DATA_CACHE, else $XDG_CACHE_HOME/rosetrainer,
    else ~/.cache/rosetrainer."""
    if os.environ.get(env.DATA_CACHE):
        return os.environ[env.DATA_CACHE]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "rosetrainer")


@dataclass
class TrainConfig:
    """Everything a training run needs; each field is one flag (`micro_batch`: `--micro-batch`)."""

    model: str = option("small", "model preset", choices=tuple(PRESETS))
    steps: int = option(120, "optimizer steps in the whole run")
    micro_batch: int = option(16, "sequences per rank per micro-step")
    seq_len: int = option(64, "tokens per training sequence (at most the preset's context)")
    grad_accum: int = option(1, "micro-steps per optimizer step (gradient accumulation)")
    lr: float = option(3e-3, "peak learning rate")
    min_lr: float = option(3e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(20, "steps of linear warm-up from 0 to --lr")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (not biases, norms)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 disables)")
    dropout: float = option(0.0, "dropout probability")
    seed: int = option(1337, "seed for initialisation, data order and dropout")
    amp: str = option("off", "mixed precision", choices=("off", "bf16", "fp16"))
    device: str = option(
        "auto", "where to train (auto: cuda if present)", choices=("auto", "cpu", "cuda")
    )
    deterministic: bool = option(
        False,
        "CUDA: deterministic kernels only (math attention, fixed cuBLAS workspace), slower; "
        "CPU runs are bitwise reproducible without it and unchanged by it",
    )
    threads: int = option(0, "CPU threads per rank (0: $OMP_NUM_THREADS if set, else all cores)")
    data: str = option(
        "stdlib",
        "training text: 'stdlib' (the Python standard library's .py files), a text file or "
        "directory, a uint16 token file ending in .bin, or 'random'",
    )
    vocab_size: int = option(0, "vocabulary of a .bin or random corpus (0: 256)")
    data_cache: str = option(
        "",
        "cache directory for the embedded corpus (empty: $ROSE_DATA_CACHE, else "
        "$XDG_CACHE_HOME/rosetrainer, else ~/.cache/rosetrainer)",
    )
    val_fraction: float = option(0.01, "fraction of the tokens held out for eval loss")
    eval_every: int = option(40, "steps between eval-loss measurements (0 disables)")
    eval_batches: int = option(4, "micro-batches per rank in one eval")
    log_every: int = option(20, "steps between console lines from rank 0 (0 disables)")
    run_dir: str = option("runs/default", "run directory (the supervisor's ROSE_RUN_DIR wins)")
    resume_from: str = option("", "checkpoint directory to resume from (ROSE_RESUME_FROM wins)")
    resume: str = option(
        "none",
        "'auto': resume from the newest valid checkpoint in the run directory",
        choices=("none", "auto"),
    )
    ckpt_every: str = option(
        "auto",
        "steps between disk checkpoints (0: only emergency and final ones), or 'auto': Young and "
        "Daly's interval sqrt(2 x cost x MTBF), from the measured cost of a save and the mean "
        "time between failures (--mtbf until a failure is seen)",
    )
    ckpt_mode: str = option(
        "auto",
        "how periodic checkpoints are written: 'async' (a background thread), 'sync' (inside "
        "the step), or 'auto': both measured by what they cost the training loop, and the "
        "cheaper one used",
        choices=("auto", "async", "sync"),
    )
    ckpt_sync: bool = option(False, "the same as --ckpt-mode sync")
    ckpt_skip_busy: bool = option(
        True,
        "skip a periodic checkpoint while the previous one is still being written instead of "
        "waiting for it (event checkpoint_save_skipped): a slow disk never stalls training, "
        "checkpoints may land further apart; --no-ckpt-skip-busy waits and keeps every "
        "--ckpt-every step",
    )
    mem_every: str = option(
        "auto",
        "steps between memory snapshots: the checkpoint's state also committed to shared "
        "memory on the node (at most two kept), which a relaunch on this node resumes from "
        "when it is newer than the newest disk checkpoint (0: off; only under the supervisor, "
        "on one node); 'auto': Young and Daly's interval, as for --ckpt-every",
    )
    mem_budget: float = option(
        0.03,
        "under --mem-every auto, the share of the training loop's time memory snapshots may "
        "take: a snapshot comes as often as that allows when Young and Daly's interval is "
        "longer (0: Young and Daly's interval alone)",
    )
    mtbf: float = option(
        3600.0,
        "mean time between failures assumed, seconds, for the 'auto' intervals until the run "
        "has seen a failure (then: its run time over its failures)",
    )
    keep_last: int = option(3, "how many of the newest checkpoints to keep")
    keep_every: int = option(
        0, "also keep every checkpoint whose step is a multiple of this (0: none)"
    )
    ckpt_fail_fatal: bool = option(
        False, "exit 76 when a checkpoint write fails (off: report it and go on)"
    )
    on_divergence: str = option(
        "stop",
        "when a step's loss or gradient norm is not finite: 'stop' (exit 74), or "
        "'rollback-skip:N': go back to the newest valid checkpoint, skip the next N global "
        "batches of data after it, and go on",
    )
    sample_log: str = option("", "debug: directory where each rank logs the sample ids it consumed")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every value; raise ConfigError naming the first bad flag and its value."""

        def bad(name: str, rule: str) -> NoReturn:
            raise ConfigError(f"{flag(name)} {rule}, got {getattr(self, name)!r}")

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                bad(f.name, f"must be one of {', '.join(choices)}")
        for name in ("steps", "micro_batch", "seq_len", "grad_accum", "eval_batches"):
            if getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        for name in (
            "warmup_steps",
            "eval_every",
            "log_every",
            "keep_every",
            "threads",
            "vocab_size",
            "seed",
        ):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not value >= 0.0 or value == float("inf"):  # also rejects NaN
                bad(name, "must be a finite number >= 0")
        for name in ("ckpt_every", "mem_every"):
            if _interval(getattr(self, name)) is _BAD:
                bad(name, "must be 'auto' or a whole number >= 0")
        if not 0.0 <= self.mem_budget < 1.0:  # also rejects NaN
            bad("mem_budget", "must be a fraction in [0, 1)")
        if not 0.0 < self.mtbf < float("inf"):
            bad("mtbf", "must be a finite number of seconds > 0")
        if self.min_lr > self.lr:
            bad("min_lr", f"must not exceed --lr ({self.lr})")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        if not 0.0 < self.val_fraction < 0.5:
            bad("val_fraction", "must be in (0, 0.5)")
        if self.keep_last < 1:
            bad("keep_last", "must be >= 1")
        if self.vocab_size > 65536:
            bad("vocab_size", "must be at most 65536 (tokens are stored as uint16)")
        block_size = PRESETS[self.model]["block_size"]
        if self.seq_len > block_size:
            bad("seq_len", f"must be at most the {self.model} preset's context ({block_size})")
        if not self.run_dir:
            bad("run_dir", "must not be empty")
        if self.on_divergence != "stop" and self.rollback_skip is None:
            bad("on_divergence", "must be 'stop' or 'rollback-skip:N' with a whole N >= 1")

    @property
    def ckpt_interval(self) -> int | None:
        """Steps between disk checkpoints; None for 'auto'."""
        return _interval(self.ckpt_every)  # type: ignore[return-value]

    @property
    def mem_interval(self) -> int | None:
        """Steps between memory snapshots; None for 'auto'."""
        return _interval(self.mem_every)  # type: ignore[return-value]

    @property
    def disk_mode(self) -> str:
        """'sync', 'async' or 'auto' (--ckpt-sync wins)."""
        return "sync" if self.ckpt_sync else self.ckpt_mode

    @property
    def rollback_skip(self) -> int | None:
        """N of ``--on-divergence rollback-skip:N``; None for ``stop`` or a malformed value."""
        mode, _, count = self.on_divergence.partition(":")
        if mode != "rollback-skip" or not (count.isascii() and count.isdigit()) or int(count) < 1:
            return None
        return int(count)

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The model's shape for this run, given the data's vocabulary size."""
        return model_config(self.model, vocab_size, self.dropout)

    def data_cache_dir(self) -> Path:
        """The embedded corpus' cache directory: --data-cache, else the documented default."""
        return Path(self.data_cache or default_data_cache())

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready values (recorded in checkpoint manifests)."""
        return dataclasses.asdict(self)


_BAD = object()


def _interval(value: object) -> int | None | object:
    """``--ckpt-every``/``--mem-every``: the steps, None for 'auto', ``_BAD`` otherwise."""
    text = str(value).strip()
    if text == "auto":
        return None
    if text.isascii() and text.isdigit():
        return int(text)
    return _BAD


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print one line that names the flag."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """The trainer's parser: one flag per `TrainConfig` field, each with its default in --help."""
    parser = _OneLineParser(
        prog=prog,
        description="Train a GPT from scratch; resumable and preemptible.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata["help"]
        if "choices" in f.metadata:
            # Choices are checked by validate() so that a bad one gets the same one-line error.
            help_text += f" ({'/'.join(f.metadata['choices'])})"
        kwargs: dict[str, Any] = {"default": f.default, "help": help_text, "dest": f.name}
        if f.type in ("bool", bool):
            # On by default: --name keeps it, --no-name turns it off.
            kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            kwargs["metavar"] = f.name.upper()
        parser.add_argument(flag(f.name), **kwargs)
    return parser


def parse_args(argv: list[str] | None = None, prog: str = "train.py") -> TrainConfig:
    """Parse and validate the trainer's flags.

    Raises ConfigError (one line naming the flag and the value) for a bad value; argparse itself
    exits with status 2 for an unknown flag or a value of the wrong type.
    """
    ns = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    return TrainConfig(**vars(ns))
