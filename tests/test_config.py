"""The training configuration: defaults, --help, and one-line errors naming the bad flag."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import TRAIN_PY
from trainer import train
from trainer.config import PRESETS, ConfigError, TrainConfig, build_parser, model_config, parse_args

BAD_FLAGS = [
    (["--steps", "0"], "--steps", "0"),
    (["--steps", "-5"], "--steps", "-5"),
    (["--micro-batch", "0"], "--micro-batch", "0"),
    (["--grad-accum", "0"], "--grad-accum", "0"),
    (["--seq-len", "0"], "--seq-len", "0"),
    (["--model", "tiny", "--seq-len", "65"], "--seq-len", "65"),
    (["--model", "huge"], "--model", "huge"),
    (["--lr", "-0.1"], "--lr", "-0.1"),
    (["--lr", "nan"], "--lr", "nan"),
    (["--lr", "1e-3", "--min-lr", "1e-2"], "--min-lr", "0.01"),
    (["--weight-decay", "-1"], "--weight-decay", "-1"),
    (["--grad-clip", "-1"], "--grad-clip", "-1"),
    (["--dropout", "1.0"], "--dropout", "1.0"),
    (["--dropout", "-0.1"], "--dropout", "-0.1"),
    (["--amp", "fp8"], "--amp", "fp8"),
    (["--device", "tpu"], "--device", "tpu"),
    (["--warmup-steps", "-1"], "--warmup-steps", "-1"),
    (["--eval-every", "-1"], "--eval-every", "-1"),
    (["--eval-batches", "0"], "--eval-batches", "0"),
    (["--ckpt-every", "-2"], "--ckpt-every", "-2"),
    (["--keep-last", "0"], "--keep-last", "0"),
    (["--mem-budget", "1"], "--mem-budget", "1.0"),
    (["--mem-budget", "-0.01"], "--mem-budget", "-0.01"),
    (["--mem-budget", "nan"], "--mem-budget", "nan"),
    (["--mtbf", "0"], "--mtbf", "0.0"),
    (["--keep-every", "-1"], "--keep-every", "-1"),
    (["--val-fraction", "0"], "--val-fraction", "0"),
    (["--val-fraction", "0.7"], "--val-fraction", "0.7"),
    (["--vocab-size", "70000"], "--vocab-size", "70000"),
    (["--resume", "latest"], "--resume", "latest"),
    (["--threads", "-1"], "--threads", "-1"),
    (["--seed", "-1"], "--seed", "-1"),
    (["--run-dir", ""], "--run-dir", "''"),
    (["--steps", "ten"], "--steps", "ten"),  # wrong type: argparse's own error, made one line
    (["--no-such-flag"], "--no-such-flag", ""),
]


@pytest.mark.parametrize(("argv", "flag", "value"), BAD_FLAGS, ids=lambda v: str(v))
def test_bad_flag_is_one_line_naming_flag_and_value(
    argv: list[str], flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = train.main(argv)
    except SystemExit as e:  # argparse's own errors (wrong type, unknown flag) exit directly
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert flag in err and value in err, err


def test_bad_flag_from_the_command_line_exits_2_with_one_line() -> None:
    # A real process: the exit status and the whole of stderr, as a user sees them.
    proc = subprocess.run(
        [sys.executable, str(TRAIN_PY), "--model", "tiny", "--seq-len", "100"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "train.py: error: --seq-len must be at most the tiny preset's context (64), got 100"
    ]
    assert proc.stdout == ""


def test_help_lists_every_field_with_its_default() -> None:
    text = " ".join(build_parser().format_help().split())  # undo the line wrapping
    fields = TrainConfig().to_dict()
    for name in fields:
        assert "--" + name.replace("_", "-") in text, name
    assert text.count("(default:") == len(fields)
    assert "(default: small)" in text and "(default: 3)" in text  # --model, --keep-last


def test_defaults_validate_and_round_trip_through_the_parser() -> None:
    assert parse_args([]) == TrainConfig()
    cfg = parse_args(["--model", "tiny", "--seq-len", "64", "--ckpt-sync", "--amp", "bf16"])
    assert (cfg.model, cfg.seq_len, cfg.ckpt_sync, cfg.amp) == ("tiny", 64, True, "bf16")


def test_a_periodic_save_behind_a_busy_writer_is_skipped_unless_asked_to_wait() -> None:
    # On by default (a slow disk never stalls the loop); --no-ckpt-skip-busy waits instead.
    assert parse_args([]).ckpt_skip_busy is True
    assert parse_args(["--no-ckpt-skip-busy"]).ckpt_skip_busy is False
    assert parse_args(["--no-ckpt-skip-busy", "--ckpt-skip-busy"]).ckpt_skip_busy is True
    assert "--no-ckpt-skip-busy" in build_parser().format_help()


def test_presets_and_model_config() -> None:
    assert set(PRESETS) >= {"tiny", "small", "gpt2"}
    cfg = model_config("gpt2", vocab_size=50304, dropout=0.1)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024)
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        model_config("nope", 256, 0.0)
