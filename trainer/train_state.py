"""The trainer's train state: what a checkpoint must hold, besides tensors, to continue a run.

It is stored as the manifest's JSON ``train_state``; the field names are the on-disk format, so a
checkpoint written before this class existed loads unchanged. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

INTEGER_MINIMUM = {
    "step": 0,
    "position": 0,
    "global_batch": 1,
    "seq_len": 1,
    "num_samples": 1,
    "metrics_offset": 0,
}
"""The least value of each integer field: the one rule for the trainer here and for ``verify``
(trainer/checkpoint/schema.py), which judges a stored state without building one."""


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Where a run stands after ``step`` optimizer steps.

    Raises ValueError, naming the field, when a value has the wrong type or is out of range.
    """

    step: int
    """Completed optimizer steps (>= 0)."""
    position: int
    """Global sampler position: samples consumed by all ranks so far (>= 0)."""
    global_batch: int
    """Samples one optimizer step consumes across all ranks (>= 1)."""
    seq_len: int
    """Tokens per training sequence (>= 1): the data order continues only with the same."""
    num_samples: int
    """Training samples of the corpus at ``seq_len`` (>= 1): likewise."""
    metrics_offset: int = 0
    """Length in bytes of ``metrics.jsonl`` at this step (>= 0)."""
    skipped: tuple[tuple[int, int], ...] = ()
    """Ranges ``[start, end)`` of global sampler positions that a rollback after a divergence
    skipped: their samples were never trained on (``--on-divergence rollback-skip:N``)."""

    def __post_init__(self) -> None:
        for name, low in INTEGER_MINIMUM.items():
            value = getattr(self, name)
            # bool is an int in Python, but a flag in a counter's place is a corrupt state.
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"train_state.{name} must be an integer >= {low}, got {value!r}")
        object.__setattr__(self, "skipped", skipped_ranges(self.skipped, self.position))

    @property
    def skipped_samples(self) -> int:
        """How many positions before ``position`` were skipped rather than trained on."""
        return sum(end - start for start, end in self.skipped)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in a checkpoint (``skipped`` only when something was: a run
        that skipped nothing stores what trainers have always stored)."""
        state: dict[str, Any] = dataclasses.asdict(self)
        del state["skipped"]
        if self.skipped:
            state["skipped"] = [list(r) for r in self.skipped]
        return state

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, default_global_batch: int | None = None
    ) -> TrainState:
        """Read a stored train state. Checkpoints from before the elastic resume carry no
        ``global_batch`` (``default_global_batch`` stands in) and older ones no
        ``metrics_offset`` (0). Unknown keys are ignored. Raises ValueError naming a missing or
        invalid field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"train_state must be a JSON object, got {type(data).__name__}")
        values = dict(data)
        if values.get("global_batch") is None and default_global_batch is not None:
            values["global_batch"] = default_global_batch
        values.setdefault("metrics_offset", 0)
        values.setdefault("skipped", ())
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError("train_state lacks " + ", ".join(missing))
        return cls(**{n: values[n] for n in names})


def skipped_ranges(value: Any, position: Any = None) -> tuple[tuple[int, int], ...]:
    """A train state's ``skipped`` as ranges: a list of ``[start, end]`` integer pairs, in order
    and apart, with ``0 <= start < end`` and every end at most ``position`` (when it is an
    integer): skipped data lies behind the position reached. Raises ValueError naming the
    first bad range."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"train_state.skipped must be a list of ranges, got {short_repr(value)}")
    ranges: list[tuple[int, int]] = []
    last_end = 0
    for item in value:
        ints = isinstance(item, (list, tuple)) and len(item) == 2
        if not ints or not all(type(v) is int for v in item):
            raise ValueError(f"train_state.skipped range {short_repr(item)} is not [start, end]")
        start, end = item
        behind = type(position) is not int or end <= position
        if not last_end <= start < end or not behind:
            raise ValueError(
                f"train_state.skipped range {list(item)} is not an ordered range of positions "
                f"after {last_end} and up to the position {position!r}"
            )
        ranges.append((start, end))
        last_end = end
    return tuple(ranges)


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to 40 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
