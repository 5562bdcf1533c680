"""Train a GPT: alone (`python trainer/train.py`) or under `torchrun ... trainer/train.py`.

Exit codes: ``runcontract.exit_codes.TrainerExit`` (0 finished, 2 bad flag / data / checkpoint,
or ranks that loaded different corpora, 74 diverged: a step's loss or gradient norm was not
finite, 75 preempted with a checkpoint written, 76 checkpoint write failed with
--ckpt-fail-fatal, 77 another process holds the checkpoint writer lock, 78 the checkpoint to
resume from cannot be used: marked UNLOADABLE.txt, an older one may load), and 1 for an
unexpected error (with its traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: Python put trainer/ itself on sys.path; put the repository root there
    # instead, so `import trainer` works without installing and no module here shadows another.
    _root = str(Path(__file__).resolve().parent.parent)
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = _root
    else:
        sys.path.insert(0, _root)

import contextlib
import dataclasses
import json
import math
import os
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from runcontract.env import DIVERGE_AT_STEP, MEM_ALTERNATE, RUN_DIR
from runcontract.events import EventType
from runcontract.exit_codes import TrainerExit
from runcontract.heartbeat import Phase
from runcontract.layout import CHECKPOINTS, METRICS, checkpoint_order, memory_dir
from trainer import determinism, supervised
from trainer.batches import Batches
from trainer.checkpoint import (
    CheckpointError,
    CheckpointIncompatible,
    CheckpointInvalid,
    CheckpointLocked,
    CheckpointStore,
    CheckpointUnloadable,
    CheckpointWriteFailed,
    find_latest_valid,
    load,
    params_sha256,
    verify,
)
from trainer.checkpoint import manifest as ckpt_manifest
from trainer.checkpoint.integrity import mark_unloadable
from trainer.checkpoint.layout import UNLOADABLE_FILE, parse_step
from trainer.checkpoint.memstore import MemoryStore
from trainer.config import ConfigError, TrainConfig, parse_args
from trainer.data import Corpus, DataError, load_corpus
from trainer.metrics import MetricsLog
from trainer.model import GPT
from trainer.preemption import Preemption
from trainer.sampler import ResumableSampler, derive_seed
from trainer.save_policy import ASYNC, SYNC, Mtbf, SavePolicy
from trainer.train_state import TrainState


class UsageError(Exception):
    """Something the user must fix (a flag that cannot work here, an incompatible checkpoint)."""


class Diverged(Exception):
    """A step whose loss or gradient norm is not finite; its update was not applied."""

    def __init__(self, step: int, loss: float, grad_norm: float, rank: int | None) -> None:
        super().__init__(
            f"diverged at step {step}: loss {loss}, grad_norm {grad_norm}"
            + (f" (non-finite loss on rank {rank})" if rank is not None else "")
        )
        self.step, self.loss, self.grad_norm, self.rank = step, loss, grad_norm, rank


class StepSummary(NamedTuple):
    """What the step's one host read tells every rank alike."""

    loss: float
    """Mean loss over ranks and micro-steps."""
    grad_norm: float
    """Global gradient norm before clipping."""
    stop: bool
    """Some rank was asked to stop (preemption)."""
    bad_rank: int | None
    """The lowest rank whose own loss was not finite; None when every rank's was."""


# Exits where every rank arrives together: the process group is destroyed, not aborted, and
# the process leaves with os._exit (see _exit).
CLEAN_EXITS = frozenset({TrainerExit.OK, TrainerExit.PREEMPTED, TrainerExit.DIVERGED})

# Rollbacks to one checkpoint, each skipping N more batches, before the run gives up (exit 74).
MAX_ROLLBACKS_PER_CHECKPOINT = 3
#: At most one ``memory_saved`` event this often: snapshots may come every few steps.
MEMORY_EVENT_SECONDS = 10.0
#: A memory snapshot longer than this (the last one's time) gets a heartbeat phase of its own.
SLOW_SNAPSHOT_SECONDS = 0.2


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine decay to
    --min-lr at the last step. A pure function of the step, so it needs no saved state."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def default_threads(cfg: TrainConfig) -> int:
    """CPU threads for this rank: --threads, else $OMP_NUM_THREADS (torchrun sets 1 per rank when
    it starts several), else every core."""
    if cfg.threads:
        return cfg.threads
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return os.cpu_count() or 1


@dataclasses.dataclass
class Dist:
    """Where this process sits in the run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 0
    """Ranks on this node (0: not known, taken as all of them)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def one_node(self) -> bool:
        """Every rank runs on this node."""
        return self.local_world_size in (0, self.world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _dist_from_env() -> Dist:
    env = os.environ
    return Dist(
        rank=int(env.get("RANK", "0")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        world_size=int(env.get("WORLD_SIZE", "1")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", "0")),
    )


def _resolve_device(cfg: TrainConfig, d: Dist) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", d.local_rank)
    if cfg.amp == "fp16":
        raise UsageError("--amp fp16 needs CUDA (fp16 with a grad scaler); use --amp bf16 on CPU")
    return torch.device("cpu")


class HostReads:
    """The training loop's device-to-host reads.

    Each one waits for the device to finish all the work queued before it, so the loop makes at
    most one per optimizer step (docs/trainer.md, "Host syncs"). Every value the loop reads from
    the device goes through :meth:`read`, which counts, so the budget can be checked.
    """

    def __init__(self) -> None:
        self.count = 0

    def read(self, t: torch.Tensor) -> list[Any]:
        """``t``'s values as Python numbers (one transfer)."""
        self.count += 1
        return t.tolist()


class Trainer:
    """One rank's training run, from start-up (or resume) to the last step."""

    def __init__(
        self,
        cfg: TrainConfig,
        corpus: Corpus,
        run_dir: Path,
        resume: Path | str | None,
        d: Dist,
        device: torch.device,
        preemption: Preemption,
        events: supervised.Events | None = None,
    ) -> None:
        """Build the model and optimizer, load ``resume`` when given, take the checkpoint store.

        Raises CheckpointUnloadable (on every rank) when any rank cannot use ``resume``, after
        marking it so; CheckpointIncompatible or UsageError when this run cannot continue it.
        """
        self.cfg, self.corpus, self.run_dir, self.d, self.device = cfg, corpus, run_dir, d, device
        self.preemption, self.events = preemption, events
        self.beat = supervised.Heartbeat(d.rank)
        self.beat(0, phase=Phase.STARTUP)
        self.host_reads = HostReads()
        self.batches = Batches(corpus, cfg.seq_len, device)
        self._build_model()
        self.sampler = ResumableSampler(
            num_samples=corpus.num_samples(cfg.seq_len),
            seed=cfg.seed,
            world_size=d.world_size,
            rank=d.rank,
            micro_batch=cfg.micro_batch,
            grad_accum=cfg.grad_accum,
        )
        self.step = self.loaded_step = 0  # loaded_step: of the checkpoint loaded last
        self.position = 0  # global sampler position: samples consumed by all ranks so far
        self.skipped: tuple[tuple[int, int], ...] = ()  # positions a rollback skipped
        self.rollbacks: dict[int, int] = {}  # checkpoint step -> rollbacks to it so far
        self.poison_step = _poison_step(d.rank)
        self._snapshot_stretch = _snapshot_stretch()
        self.last_loss = float("nan")
        self.last_saved_step = -1
        # A fresh start empties metrics.jsonl; a resume cuts it back to its checkpoint.
        metrics_length = 0 if resume is None else self._resume_on_every_rank(Path(resume))
        self.beat(self.step, phase=Phase.STARTUP)
        # DDP after loading: it broadcasts rank 0's parameters, which are the loaded ones.
        self.ddp = DDP(self.model) if d.enabled else None
        if self.ddp is not None:
            self._settle_buckets(self.ddp)
        self.store = CheckpointStore(
            run_dir,
            is_writer=d.is_main,
            keep_last=cfg.keep_last,
            keep_every=cfg.keep_every,
            async_save=cfg.disk_mode != SYNC,
            fail_fatal=cfg.ckpt_fail_fatal,
            on_event=events,
        )
        self.policy = self._save_policy()
        # The memory tier: rank 0 only (the ranks hold the same state), under a supervisor
        # (which chooses and removes snapshots), on one node (a snapshot lives on one node).
        self.mem = MemoryStore(
            run_dir,
            enabled=bool(cfg.mem_interval != 0 and os.environ.get(RUN_DIR))
            and d.is_main
            and d.one_node,
            on_event=events,
            event_every=MEMORY_EVENT_SECONDS,
        )
        self.policy.memory_covers = self.mem.enabled
        self._mem_seconds = float("inf")  # the first snapshot's cost is not known yet
        # Every checkpoint records the configuration; it does not change, and a memory
        # snapshot every few steps should not rebuild it each time (built at the first).
        self._config_record: dict[str, Any] | None = None
        self.sample_log = None
        if cfg.sample_log:
            Path(cfg.sample_log).mkdir(parents=True, exist_ok=True)
            self.sample_log = open(Path(cfg.sample_log) / f"rank-{d.rank}.jsonl", "a")  # noqa: SIM115
        self.metrics = MetricsLog(run_dir / METRICS, enabled=d.is_main)
        self.metrics.open(truncate_to=metrics_length)

    def _save_policy(self) -> SavePolicy:
        """When this rank saves, and how. An auto interval is rank 0's alone (it measures
        the cost); the other ranks, whose saves write nothing, then never save periodically."""
        cfg = self.cfg
        ckpt_every, mem_every = cfg.ckpt_interval, cfg.mem_interval
        if not self.d.is_main:
            ckpt_every = 0 if ckpt_every is None else ckpt_every
            mem_every = 0
        return SavePolicy(
            ckpt_every=ckpt_every,
            mem_every=mem_every,
            mode=cfg.disk_mode,
            mtbf=Mtbf.from_env(cfg.mtbf),
            mem_budget=cfg.mem_budget,
            emit=lambda type_, **fields: self._emit(EventType(type_), **fields),
        )

    def _build_model(self) -> None:
        cfg = self.cfg
        self.model_cfg = cfg.model_config(self.corpus.vocab_size)
        self.model = self._initial_model()
        self.optimizer = torch.optim.AdamW(
            self.model.optimizer_groups(cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95)
        )
        self.scaler = self._fresh_scaler()
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)

    def _initial_model(self) -> GPT:
        # Same seed on every rank: identical initial weights (DDP would broadcast them anyway).
        torch.manual_seed(derive_seed("init", self.cfg.seed))
        return GPT(self.model_cfg).to(self.device)

    def _fresh_scaler(self) -> torch.amp.GradScaler:
        # Disabled unless fp16: then scale, unscale_, step and update are plain pass-throughs.
        return torch.amp.GradScaler(self.device.type, enabled=self.cfg.amp == "fp16")

    def _settle_buckets(self, ddp: DDP) -> None:
        """One throw-away forward and backward, so that every real step of every attempt
        all-reduces with the same bucket layout.

        DDP starts with a provisional layout and rebuilds it, once, from the order in which the
        first backward produced the gradients. Gloo sums each element of a bucket in an order
        that depends on its offset there, so with three or more ranks the two layouts give
        different bits: without this, the first step after a resume would reduce differently
        from the same step of an uninterrupted run. torch offers no public way to skip or force
        the rebuild (find_unused_parameters=True skips it, at the price of a graph traversal
        every step and a layout that overlaps communication worse), so take it here.

        The loss is multiplied by 0 and the gradients dropped: the optimizer, its state, the
        sampler position and the metrics are untouched, and the dropout draws made here are
        forgotten because every step reseeds its generator (_train_step)."""
        x = torch.zeros((1, self.cfg.seq_len), dtype=torch.long, device=self.device)
        with self._autocast():
            _, loss = ddp(x, x)
        assert loss is not None
        (loss * 0.0).backward()
        self.optimizer.zero_grad(set_to_none=True)

    # -- resume -------------------------------------------------------------------------------

    def _resume_on_every_rank(self, path: Path) -> int | None:
        """Resume from ``path`` (returns what ``_resume`` does), or raise CheckpointUnloadable
        on every rank when any rank cannot load it: the ranks that loaded it must not go on
        alone. A rank that fails writes the mark first, so a search that follows (``--resume
        auto``, the supervisor) sees it."""
        failure = None
        metrics_length = None
        try:
            metrics_length = self._resume(path)
        except CheckpointUnloadable as e:
            failure = e
            try:
                mark_unloadable(path, e.reason)
            except OSError as err:
                print(f"warning: cannot write {path / UNLOADABLE_FILE}: {err}", file=sys.stderr)
        if self.d.enabled:
            failed = torch.tensor([1.0 if failure else 0.0], device=self.device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if failed.item() and failure is None:
                failure = CheckpointUnloadable("another rank could not load it", path)
        if failure is not None:
            raise failure
        return metrics_length

    def _load(self, path: Path) -> dict[str, Any]:
        """``load`` into this rank's objects. A checkpoint that cannot be used is
        CheckpointUnloadable; one whose recorded model config differs from this run's stays
        CheckpointIncompatible (bad input: an older checkpoint would not fit either)."""
        try:
            manifest = self._verify_once(path)
            return load(
                path,
                self.model,
                self.optimizer,
                self.scaler,
                map_location=self.device,
                verified=manifest,
            )
        except CheckpointUnloadable:
            raise
        except CheckpointInvalid as e:
            raise CheckpointUnloadable(e.reason, path) from e
        except CheckpointIncompatible as e:
            try:
                differs = self._model_config_differs(ckpt_manifest.read(path))
            except CheckpointError:
                raise e from None  # a newer format: not this code's to judge
            if differs is None:
                raise CheckpointUnloadable(
                    f"{e} — yet its manifest records this run's model config, so its tensors do "
                    "not match its own record",
                    path,
                ) from e
            raise CheckpointIncompatible(f"{e} (it was saved by {differs})") from e

    def _verify_once(self, path: Path) -> dict[str, Any]:
        """Rank 0 verifies ``path`` (reads and hashes every file) and the others take its
        verdict: at start-up a checkpoint on shared storage is read in full once, not once per
        rank. Each rank still checks the parameters it loads against ``params_sha256``. Raises
        what ``verify`` raised on rank 0, on every rank."""
        verdict: list[Any] = [None]
        if self.d.is_main:
            try:
                verdict[0] = ("ok", verify(path))
            except CheckpointInvalid as e:
                verdict[0] = ("invalid", e.reason)
            except CheckpointIncompatible as e:
                verdict[0] = ("incompatible", str(e))
        if self.d.enabled:
            dist.broadcast_object_list(verdict, src=0)
        kind, value = verdict[0]
        if kind == "invalid":
            raise CheckpointInvalid(value, path)
        if kind == "incompatible":
            raise CheckpointIncompatible(value)
        return value

    def _model_config_differs(self, manifest: dict[str, Any]) -> str | None:
        """How the model config a manifest records differs from this run's in the fields that
        shape tensors (dropout shapes none); None when it does not."""
        ours = dataclasses.asdict(self.model_cfg)
        config = manifest.get("config")
        saved = config.get("model") if isinstance(config, dict) else None
        if not isinstance(saved, dict):
            return "a script that recorded no model config"
        keys = [k for k in ours if k != "dropout" and saved.get(k) != ours[k]]
        if not keys:
            return None
        return "model config " + ", ".join(
            f"{k}={saved.get(k)!r} where this run has {ours[k]!r}" for k in keys
        )

    def _resume(self, path: Path) -> int | None:
        """Load checkpoint ``path``; return the length to cut metrics.jsonl back to (None: leave
        the file as it is)."""
        manifest = self._load(path)
        try:
            state = TrainState.from_dict(
                manifest.get("train_state") or {}, default_global_batch=self.sampler.global_batch
            )
        except ValueError as e:
            raise CheckpointIncompatible(f"{path}: {e}") from e
        expected = {"seq_len": self.cfg.seq_len, "num_samples": self.sampler.num_samples}
        for key, value in expected.items():
            if getattr(state, key) != value:
                raise CheckpointIncompatible(
                    f"{path}: saved with {key}={getattr(state, key)!r}, this run has {value!r} "
                    "(the data order would not continue); use the same --data and --seq-len"
                )
        if state.global_batch != self.sampler.global_batch:
            self._keep_global_batch(state.global_batch, path)
        self.step, self.position, self.skipped = state.step, state.position, state.skipped
        self.loaded_step = self.step
        parent = path.resolve().parent
        in_memory = parent == memory_dir(self.run_dir).resolve()
        # A memory snapshot is not durable: the run's final state must still reach the disk.
        self.last_saved_step = -1 if in_memory else self.step
        self._log(f"resumed from {path} at step {self.step}")
        # The metrics cursor describes this run's metrics.jsonl only when the checkpoint is one
        # of this run's own; from another run directory, leave the file as it is.
        own = in_memory or parent == (self.run_dir / CHECKPOINTS).resolve()
        return state.metrics_offset if own else None

    def _keep_global_batch(self, global_batch: int, path: Path) -> None:
        """Resume with another world size (or micro-batch) on the checkpoint's global batch:
        gradient accumulation makes up the difference, so the optimizer sees the same batch
        size and the sampler continues the same global order. Raises UsageError when the
        batch cannot be split evenly."""
        per_micro_step = self.d.world_size * self.cfg.micro_batch
        if global_batch % per_micro_step:
            raise UsageError(
                f"{path}: its global batch of {global_batch} sequences cannot be split into "
                f"{self.d.world_size} rank(s) x --micro-batch {self.cfg.micro_batch} x a whole "
                f"number of accumulation steps; choose a --micro-batch (and world size) whose "
                f"product divides {global_batch}"
            )
        accum = global_batch // per_micro_step
        self.cfg = dataclasses.replace(self.cfg, grad_accum=accum)
        self._config_record = None
        self.sampler = dataclasses.replace(self.sampler, grad_accum=accum)
        self._log(
            f"resumed with {self.d.world_size} rank(s): grad_accum {accum} keeps the "
            f"checkpoint's global batch of {global_batch} sequences"
        )

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Train to --steps; return the exit code (0 finished, 74 diverged, 75 preempted)."""
        model = self.ddp or self.model
        model.train()
        policy = self.policy
        while self.step < self.cfg.steps:
            writing = self.store.in_flight
            started = time.perf_counter()
            try:
                stop = self._one_step(model)
            except Diverged as e:
                code = self._on_divergence(e)
                if code is not None:
                    return code
                continue
            policy.on_step(time.perf_counter() - started, writer_busy=writing)
            if not self.store.in_flight:  # the cost of an asynchronous save is complete
                policy.writer_done(self.store.writing_step, self.store.last_write_seconds)
            if stop:
                return self._preempted()
            cfg = self.cfg
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self._eval()
            if policy.disk_due(self.step):
                self._save_periodic()
            # Not at the last step: the final checkpoint goes to disk right after.
            if policy.memory_due(self.step) and self.step < cfg.steps and self._snapshots_on():
                self._save_memory()
        return self._finished()

    def _one_step(self, model: torch.nn.Module) -> bool:
        """One optimizer step, logged; True when some rank was asked to stop (every rank gets
        the same answer, after the same step). Raises Diverged, on every rank alike, when the
        step's loss or gradient norm is not finite; its update is then not applied."""
        t0 = time.perf_counter()
        loss_sum, grad_norm = self._forward_backward(model)
        # The step's one host read comes before the update, so that a non-finite step is
        # caught before it reaches the weights and the optimizer state.
        summary = self._step_summary(loss_sum, grad_norm)
        self._check_finite(summary)
        self._update()
        loss, grad_norm_value, stop = summary.loss, summary.grad_norm, summary.stop
        dt = time.perf_counter() - t0
        self.step += 1
        self.position += self.sampler.global_batch
        self.last_loss = loss
        self.beat(self.step, phase=Phase.TRAIN)
        lr = lr_at(self.cfg, self.step - 1)
        tokens_per_s = self.sampler.global_batch * self.cfg.seq_len / dt
        self.metrics.append(
            {
                "step": self.step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm_value,
                "tokens_per_s": tokens_per_s,
                "step_time": dt,
                "time": time.time(),
            }
        )
        if self.cfg.log_every and self.step % self.cfg.log_every == 0:
            self._log(
                f"step {self.step}/{self.cfg.steps} loss {loss:.4f} lr {lr:.2e} "
                f"grad_norm {grad_norm_value:.3f} tok/s {tokens_per_s:.0f}"
            )
        return stop

    def _forward_backward(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward, gradients unscaled and clipped; returns this rank's loss (summed
        over micro-steps, a float64 scalar) and the gradient norm before clipping, both still on
        the device."""
        cfg = self.cfg
        # Everything random inside the step (dropout) draws from a generator seeded by
        # (seed, rank, step): a resumed run replays it exactly without any saved RNG state.
        torch.manual_seed(derive_seed("step", cfg.seed, self.d.rank, self.step))
        lr = lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # float64 and summed in micro-step order: the same number a host-side sum of the
        # micro-steps' losses gives, without reading each one.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(cfg.grad_accum):
            ids = self.sampler.micro_batch_ids(self.position, micro)
            self._log_samples(micro, ids)
            x, y = self.batches.train(ids)
            last = micro == cfg.grad_accum - 1
            # Gradients are all-reduced once per optimizer step, on the last micro-step.
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync, self._autocast():
                _, loss = model(x, y)
                assert loss is not None
                loss = loss / cfg.grad_accum
            self.scaler.scale(loss).backward()
            # Queued behind this micro-step's work: the host builds the next batch meanwhile.
            self.batches.prefetch(self._next_ids(micro))
            loss_sum += loss.detach()
        if self.sample_log is not None:
            self.sample_log.flush()
        self.scaler.unscale_(self.optimizer)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.poison_step is not None:
            first = (self.poison_step - 1) * self.sampler.global_batch
            if self.position == first:  # test only: that step's data makes the loss NaN
                loss_sum = loss_sum + float("nan")
        return loss_sum, grad_norm

    def _check_finite(self, summary: StepSummary) -> None:
        """Raise Diverged when the step's loss or gradient norm is not finite, after dropping
        its gradients. Under fp16 an infinite gradient norm is the grad scaler's overflow, which
        it handles itself (it skips that update and lowers its scale): only the loss counts."""
        norm_ok = math.isfinite(summary.grad_norm) or self.scaler.is_enabled()
        if math.isfinite(summary.loss) and norm_ok:
            return
        self.optimizer.zero_grad(set_to_none=True)
        raise Diverged(self.step + 1, summary.loss, summary.grad_norm, summary.bad_rank)

    def _update(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _next_ids(self, micro: int) -> list[int] | None:
        """The sample ids this rank reads after micro-step ``micro`` of the current step."""
        if micro + 1 < self.cfg.grad_accum:
            return self.sampler.micro_batch_ids(self.position, micro + 1)
        if self.step + 1 < self.cfg.steps:
            return self.sampler.micro_batch_ids(self.position + self.sampler.global_batch, 0)
        return None

    def _log_samples(self, micro: int, ids: list[int]) -> None:
        if self.sample_log is not None:
            record = {"step": self.step, "micro": micro, "ids": ids, "pid": os.getpid()}
            self.sample_log.write(json.dumps(record) + "\n")

    def _step_summary(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> StepSummary:
        """The step's one all-reduce and one host read.

        Gloo has no AVG, so everything is summed: the losses (then divided, as the metrics have
        always been computed), the preemption flags (any non-zero sum stops every rank), the
        gradient norm of rank 0 alone — after DDP's all-reduce every rank holds the same
        gradients, and adding zeros keeps rank 0's norm bit for bit — and 2**-rank from each
        rank whose own loss is not finite: the sum's binary exponent is its largest term's, the
        lowest such rank's (exact unless 53 ranks in a row diverge at once, when it may name the
        one before; beyond rank 1074 the term is 0 and the rank goes unnamed)."""
        zero = torch.zeros_like(loss_sum)
        norm = grad_norm.detach().to(torch.float64) if self.d.is_main else zero
        stop = zero + (1.0 if self.preemption.requested else 0.0)
        bad = torch.where(torch.isfinite(loss_sum), zero, zero + 2.0**-self.d.rank)
        loss_total, norm_value, stops, bads = self._sum_over_ranks(
            torch.stack([loss_sum, norm, stop, bad])
        )
        lowest = 1 - math.frexp(bads)[1] if bads > 0 else None
        return StepSummary(loss_total / self.d.world_size, norm_value, stops > 0, lowest)

    def _sum_over_ranks(self, t: torch.Tensor) -> list[float]:
        """``t`` summed over all ranks, read to the host (one host read)."""
        if self.d.enabled:
            dist.all_reduce(t)
        return self.host_reads.read(t)

    # -- divergence ---------------------------------------------------------------------------

    def _on_divergence(self, e: Diverged) -> int | None:
        """After a step that diverged (its update not applied): roll back and return None to
        train on, or stop and return 74. Every rank decides alike. A save in flight holds an
        earlier, healthy step: it lands first, and no checkpoint of the diverged state is
        written."""
        self.store.wait()
        refusal, target = self._rollback_target()
        self._emit(
            EventType.DIVERGED,
            step=e.step,
            loss=_json_number(e.loss),
            grad_norm=_json_number(e.grad_norm),
            rank=e.rank,
            action="stop" if refusal else "rollback",
            reason=refusal,
        )
        if refusal is None:
            self._log(f"{e}; rolling back")
            self._roll_back(target)
            return None
        print(f"train.py: error: {e}; {refusal}", file=sys.stderr, flush=True)
        self._barrier()
        # From here on a signal (torchrun's SIGTERM as a peer exits first) exits 74 at once.
        self.preemption.checkpoint_written(TrainerExit.DIVERGED)
        return TrainerExit.DIVERGED

    def _rollback_target(self) -> tuple[str | None, Path | None]:
        """(None, the checkpoint to roll back to: None for the initial weights), or (why not,
        None)."""
        if self.cfg.rollback_skip is None:
            return "stopping (--on-divergence stop)", None
        target = _newest_valid(self.run_dir, self.d, self.events)
        if target is None and self.loaded_step:
            return f"stopping: no valid checkpoint is left (step {self.loaded_step} was)", None
        step = 0 if target is None else parse_step(target.name) or 0
        if step > self.step:
            return f"stopping: the newest valid checkpoint {target} is past this run", None
        if self.rollbacks.get(step, 0) >= MAX_ROLLBACKS_PER_CHECKPOINT:
            return (
                f"stopping: rolled back to step {step} {MAX_ROLLBACKS_PER_CHECKPOINT} times",
                None,
            )
        return None, target

    def _roll_back(self, target: Path | None) -> None:
        """Go back to ``target`` (None: the initial weights) and skip the N global batches that
        follow it, N x the rollbacks to it so far: the data that diverged once is not trained on
        again. The skipped positions are recorded (``skipped``) and reported (``data_skipped``).
        """
        self.beat(self.step, phase=Phase.CHECKPOINT)
        offset = self._reset_to_start() if target is None else self._resume_on_every_rank(target)
        self.mem.drop_from(self.step + 1)  # snapshots past it hold the data that diverged
        if not self.mem.enabled:
            self.policy.memory_off(self.step)
        self.metrics.close()
        self.metrics.open(truncate_to=offset)
        count = self.rollbacks[self.step] = self.rollbacks.get(self.step, 0) + 1
        batches = count * (self.cfg.rollback_skip or 0)
        start, self.position = self.position, self.position + batches * self.sampler.global_batch
        self.skipped = (*self.skipped, (start, self.position))
        self._emit(
            EventType.DATA_SKIPPED,
            step=self.step,
            checkpoint=str(target) if target else None,
            ranges=[[start, self.position]],
            batches=batches,
            samples=self.position - start,
            skipped=[list(r) for r in self.skipped],
        )
        self._log(
            f"rolled back to step {self.step}: skipped {batches} global batch(es), sampler "
            f"positions {start} to {self.position}"
        )
        self.beat(self.step, phase=Phase.TRAIN)

    def _reset_to_start(self) -> int:
        """The initial weights, a fresh optimizer and scaler, the start of the data; returns
        the length to cut metrics.jsonl back to."""
        with torch.no_grad():
            self.model.load_state_dict(self._initial_model().state_dict())
        self.optimizer.state.clear()
        self.scaler = self._fresh_scaler()
        self.step = self.position = self.loaded_step = 0
        self.skipped, self.last_saved_step = (), -1
        return 0

    def _emit(self, type_: EventType, **fields: Any) -> None:
        if self.events is not None:
            self.events({"type": type_, **fields})

    # -- the end ------------------------------------------------------------------------------

    def _preempted(self) -> int:
        self._save(sync=True)
        self._barrier()  # past it, every rank knows the checkpoint is durable
        self.preemption.checkpoint_written(TrainerExit.PREEMPTED)
        self._log(f"preempted: checkpoint at step {self.step} written; exiting")
        return TrainerExit.PREEMPTED

    def _finished(self) -> int:
        # Every finished run commits its final state, whatever --ckpt-every says.
        if self.last_saved_step != self.step:
            self._save(sync=True)
        self.beat(self.step, phase=Phase.CHECKPOINT)
        self.store.wait()
        self._barrier()
        # The run is over: a preemption signal from now on has nothing left to save, and must
        # not turn a finished run into a death by signal.
        self.preemption.checkpoint_written(TrainerExit.OK)
        self.beat(self.step, phase=Phase.DONE)
        if self.d.is_main:
            print(
                f"done step={self.step} loss={self.last_loss:.4f} "
                f"host_reads={self.host_reads.count} params_sha256={params_sha256(self.model)}",
                flush=True,
            )
        return TrainerExit.OK

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def _eval(self) -> None:
        self.beat(self.step, phase=Phase.EVAL)
        self.model.eval()
        mb = self.cfg.micro_batch
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for k in range(self.cfg.eval_batches):
            x, y = self.batches.val((k * self.d.world_size + self.d.rank) * mb, mb)
            with self._autocast():
                _, loss = self.model(x, y)
            assert loss is not None
            total += loss
        self.model.train()
        (loss_total,) = self._sum_over_ranks((total / self.cfg.eval_batches).reshape(1))
        eval_loss = loss_total / self.d.world_size
        self.metrics.append({"step": self.step, "eval_loss": eval_loss, "time": time.time()})
        self._log(f"step {self.step}/{self.cfg.steps} eval_loss {eval_loss:.4f}")
        self.beat(self.step, phase=Phase.TRAIN)

    def _barrier(self) -> None:
        if self.d.enabled:
            dist.barrier()

    # -- checkpoints and logs -----------------------------------------------------------------

    def _save_periodic(self) -> None:
        """A save the schedule asked for, written the way the policy chose; what it cost the
        loop is reported back."""
        mode = self.policy.disk_mode()
        started = time.perf_counter()
        if self._save(sync=False, asynchronous=mode == ASYNC):
            self.policy.disk_saved(self.step, mode, time.perf_counter() - started)
        else:
            self.policy.disk_skipped(self.step)

    def _save(self, sync: bool, asynchronous: bool | None = None) -> bool:
        """Save this step; ``sync``: committed before returning (final and emergency saves,
        always made). A periodic save is skipped, not waited for, while the previous one is
        still being written (unless --no-ckpt-skip-busy). True when the save was made."""
        self.beat(self.step, phase=Phase.CHECKPOINT)
        state, meta = self._checkpoint_state()
        saved = self.store.save(
            self.step, self.model, self.optimizer, self.scaler, state, meta,
            skip_if_busy=self.cfg.ckpt_skip_busy and not sync,
            asynchronous=False if sync else asynchronous,
        )  # fmt: skip
        if sync:
            self.store.wait()
        if saved:
            self.last_saved_step = self.step
        self.beat(self.step, phase=Phase.TRAIN)
        return saved

    def _snapshots_on(self) -> bool:
        """False in a stretch of steps without snapshots (``ROSE_MEM_ALTERNATE``)."""
        stretch = self._snapshot_stretch
        return not stretch or (self.step // stretch) % 2 == 0

    def _save_memory(self) -> None:
        """The same state as a disk checkpoint, committed to the memory tier (rank 0 only)."""
        if not self.mem.enabled:
            return
        # A snapshot shorter than a heartbeat's throttle needs no phase of its own: two forced
        # beats would cost more than the snapshot of a small model.
        slow = self._mem_seconds > SLOW_SNAPSHOT_SECONDS
        if slow:
            self.beat(self.step, phase=Phase.CHECKPOINT)
        started = time.perf_counter()
        state, meta = self._checkpoint_state()
        self.mem.save(self.step, self.model, self.optimizer, self.scaler, state, meta)
        self._mem_seconds = time.perf_counter() - started
        if self.mem.enabled:
            self.policy.memory_saved(self.step, self._mem_seconds)
        else:  # it could not write: the disk alone protects the run from now on
            self.policy.memory_off(self.step)
        if slow:
            self.beat(self.step, phase=Phase.TRAIN)

    def _checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(train_state, meta)`` of a checkpoint of the current step: what exact resume
        needs besides the tensors."""
        state = TrainState(
            step=self.step,
            position=self.position,
            global_batch=self.sampler.global_batch,
            seq_len=self.cfg.seq_len,
            num_samples=self.sampler.num_samples,
            metrics_offset=self.metrics.offset,
            skipped=self.skipped,
        )
        if self._config_record is None:
            self._config_record = {
                "model": dataclasses.asdict(self.model_cfg),
                "train": self.cfg.to_dict(),
            }
        meta = {
            "tokens_seen": (self.position - state.skipped_samples) * self.cfg.seq_len,
            "world_size": self.d.world_size,
            "config": self._config_record,
            "data": self.corpus.name,
        }
        return state.to_dict(), meta

    def _log(self, message: str) -> None:
        if self.d.is_main:
            print(message, flush=True)

    def close(self) -> None:
        """Stop the checkpoint store's writer and close files (idempotent)."""
        with contextlib.suppress(Exception):
            self.store.close()
        self.metrics.close()
        if self.sample_log is not None and not self.sample_log.closed:
            self.sample_log.close()


def _find_resume(
    cfg: TrainConfig, run_dir: Path, d: Dist, env: supervised.SupervisedEnv | None
) -> Path | None:
    """Which checkpoint to start from: the supervisor's choice when supervised, else the flags.
    With --resume auto only rank 0 searches (the search may quarantine); the others take its
    answer, so every rank loads the same step."""
    if env is not None:
        return _agree_on_resume(env.resume_from, d)
    if cfg.resume_from:
        if not Path(cfg.resume_from).is_dir():
            raise UsageError(f"--resume-from {cfg.resume_from}: no such checkpoint directory")
        return Path(cfg.resume_from)
    if cfg.resume != "auto":
        return None
    latest = _newest_valid(run_dir, d)
    if latest is None and d.is_main:
        print(f"--resume auto: no valid checkpoint in {run_dir}; starting fresh", flush=True)
    return latest


def _newest_valid(
    run_dir: Path, d: Dist, on_event: Callable[[dict[str, Any]], None] | None = None
) -> Path | None:
    """The newest valid checkpoint of ``run_dir`` on every rank: only rank 0 searches (the
    search may quarantine), the others take its answer, so every rank loads the same step."""
    found: list[Any] = [None]
    if d.is_main:
        latest = find_latest_valid(run_dir, on_event=on_event)
        found[0] = str(latest) if latest is not None else None
    if d.enabled:
        dist.broadcast_object_list(found, src=0)
    return Path(found[0]) if found[0] else None


def _json_number(x: float) -> float | str:
    """``x``, or ``"nan"``, ``"inf"``, ``"-inf"``: strict JSON readers (jq) refuse the bare
    ``NaN`` that Python writes."""
    return x if math.isfinite(x) else str(x)


def _poison_step(rank: int) -> int | None:
    """Test only (``ROSE_DIVERGE_AT_STEP=STEP[:RANK]``): the step whose data makes this rank's
    loss NaN; None when unset, or set for another rank. Raises UsageError when malformed."""
    raw = os.environ.get(DIVERGE_AT_STEP, "")
    if not raw:
        return None
    step, _, only = raw.partition(":")
    try:
        if only and int(only) != rank:
            return None
        return int(step)
    except ValueError:
        raise UsageError(f"{DIVERGE_AT_STEP}={raw!r} is not STEP or STEP:RANK") from None


def _snapshot_stretch() -> int:
    """Benchmark only (``ROSE_MEM_ALTERNATE=N``): the length of the stretches of steps that
    alternately take memory snapshots and do not; 0 (unset): every stretch takes them. Raises
    UsageError when malformed."""
    raw = os.environ.get(MEM_ALTERNATE, "")
    try:
        n = int(raw or "0")
    except ValueError:
        n = -1
    if n < 0:
        raise UsageError(f"{MEM_ALTERNATE}={raw!r} is not a number of steps")
    return n


def _agree_on_resume(chosen: Path | None, d: Dist) -> Path | None:
    """The checkpoint every rank loads: the newest that any node's supervisor chose.

    On several nodes each supervisor chooses on its own, and a late commit by the previous
    attempt's rank 0 (the only writer) can reach one node's choice and not another's. This
    attempt's process group exists only once every node has stopped its old attempt, and the
    writer's node chose after its writer was stopped, so the newest of the choices is the newest
    committed checkpoint and can no longer be overtaken (docs/multinode.md). On one node every
    rank got the same path anyway."""
    if not d.enabled:
        return chosen
    choices: list[Any] = [None] * d.world_size
    dist.all_gather_object(choices, str(chosen) if chosen is not None else None)
    agreed = max(choices, key=checkpoint_order)  # the first of equals: every rank picks the same
    result = Path(agreed) if agreed else None
    if result != chosen:
        print(
            f"rank {d.rank}: resuming from {result} (the newest any node chose) rather than "
            f"this node's choice {chosen}, so that every rank loads the same step",
            file=sys.stderr,
            flush=True,
        )
    return result


def _fail(message: str, code: int) -> int:
    # One write of the whole line: ranks that share a stderr (torchrun without --redirects)
    # never glue their lines together, as print's separate newline write could.
    sys.stderr.write(f"train.py: error: {message}\n")
    sys.stderr.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    """Parse flags, train, and return the process exit code (see the module docstring).

    Every check that can fail on user input (flags, supervisor environment, data, device) runs
    before any process group is created; only the comparison of the ranks' corpora needs one.
    """
    try:
        cfg = parse_args(argv)
        env = supervised.from_env()
    except (ConfigError, ValueError) as e:
        return _fail(str(e), TrainerExit.USAGE)
    if cfg.deterministic:
        # Before the first CUDA call (torch.cuda.is_available in _resolve_device).
        determinism.set_cublas_workspace()
    # Armed first: a worker whose supervisor dies during a slow start-up must not linger.
    supervised.guard_parent()
    run_dir = env.run_dir if env is not None else Path(cfg.run_dir)
    d = _dist_from_env()
    try:
        corpus = load_corpus(
            cfg.data,
            cache_dir=cfg.data_cache_dir(),
            vocab_size=cfg.vocab_size,
            val_fraction=cfg.val_fraction,
            seq_len=cfg.seq_len,
        )
        device = _resolve_device(cfg, d)
    except (DataError, UsageError) as e:
        return _fail(str(e), TrainerExit.USAGE)

    # From here on a preemption signal asks for a checkpoint instead of ending the process.
    preemption = Preemption()
    preemption.install()
    try:
        with determinism.deterministic(cfg.deterministic, device):
            return _train(cfg, env, run_dir, d, corpus, device, preemption)
    finally:
        preemption.uninstall()


def _train(
    cfg: TrainConfig,
    env: supervised.SupervisedEnv | None,
    run_dir: Path,
    d: Dist,
    corpus: Corpus,
    device: torch.device,
    preemption: Preemption,
) -> int:
    torch.set_num_threads(default_threads(cfg))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if d.enabled:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    trainer = None
    # Rank 0 reports checkpoint events to the supervisor; the others have nothing to add.
    events = supervised.Events(env if d.is_main else None)
    try:
        _check_same_corpus(cfg, corpus, d)
        trainer = _start(
            cfg,
            env,
            run_dir,
            d,
            lambda resume: Trainer(cfg, corpus, run_dir, resume, d, device, preemption, events),
        )
        code = trainer.run()
    except CheckpointLocked as e:
        code = _fail(str(e), TrainerExit.CKPT_LOCKED)
    except CheckpointWriteFailed as e:
        code = _fail(f"checkpoint write failed: {e}", TrainerExit.CKPT_FAILED)
    except CheckpointUnloadable as e:
        events({"type": EventType.CHECKPOINT_UNLOADABLE, "path": str(e.path), "reason": e.reason})
        where = f"{e.path} cannot be used ({e.reason})" if e.path else e.reason
        code = _fail(f"checkpoint {where}", TrainerExit.CKPT_UNLOADABLE)
    except (CheckpointError, UsageError) as e:
        code = _fail(str(e), TrainerExit.USAGE)
    except BaseException:
        _leave_process_group(d, clean=False)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        events.close()
    _leave_process_group(d, clean=code in CLEAN_EXITS)
    return code


def _check_same_corpus(cfg: TrainConfig, corpus: Corpus, d: Dist) -> None:
    """Refuse to train when the ranks loaded different data: nothing else would notice (the
    default corpus is the running Python's standard library, which differs between nodes), and
    each rank would silently learn from its own. Raises UsageError naming the ranks whose
    corpus differs from rank 0's."""
    if not d.enabled:
        return
    prints: list[Any] = [None] * d.world_size
    dist.all_gather_object(prints, corpus.fingerprint)
    differ = [r for r, fp in enumerate(prints) if fp != prints[0]]
    if differ:
        hint = " (the same Python build)" if cfg.data == "stdlib" else ""
        raise UsageError(
            f"--data {cfg.data}: rank(s) {', '.join(map(str, differ))} loaded a different corpus "
            f"from rank 0's (fingerprint {prints[differ[0]]} vs {prints[0]}); every node needs "
            f"the same data{hint}"
        )


def _leave_process_group(d: Dist, *, clean: bool) -> None:
    """Destroy the process group after a finished, preempted or diverged run, where every rank
    arrives together, and only there: on an error path a peer may be waiting in a collective, and
    destroying the group can then block in NCCL, so that this rank's exit code never reaches
    torchrun. There the group is aborted where the backend supports it, and left behind."""
    if not (d.enabled and dist.is_initialized()):
        return
    if clean:
        dist.destroy_process_group()
        return
    abort = getattr(dist.group.WORLD, "abort", None)  # public on ProcessGroup since torch 2.5
    if callable(abort):
        with contextlib.suppress(Exception):
            abort()


def _start(
    cfg: TrainConfig,
    env: supervised.SupervisedEnv | None,
    run_dir: Path,
    d: Dist,
    build: Callable[[Path | None], Trainer],
) -> Trainer:
    """``build(checkpoint)``: the trainer, resumed from the checkpoint it should start from.

    Under ``--resume auto`` (no supervisor, no --resume-from) a checkpoint that cannot be used
    is marked, quarantined by the next search, and the next older one is tried. Once one was
    passed over, running out of checkpoints ends the run (CheckpointUnloadable) rather than
    training from scratch: a model the code no longer builds as its checkpoints record would
    otherwise quietly discard them all. Elsewhere the error reaches the caller (exit 78).
    """
    auto = env is None and not cfg.resume_from and cfg.resume == "auto"
    passed_over = 0
    while True:
        resume = _find_resume(cfg, run_dir, d, env)
        if resume is None and passed_over:
            raise CheckpointUnloadable(
                f"--resume auto: {passed_over} checkpoint(s) could not be loaded (now in "
                f"{run_dir / 'checkpoints' / 'quarantine'}) and no older one is left; not "
                "starting from scratch over them"
            )
        try:
            return build(resume)
        except CheckpointUnloadable as e:
            if not auto:
                raise
            passed_over += 1
            if d.is_main:
                print(
                    f"--resume auto: {e.path} cannot be used ({e.reason}); trying an older one",
                    file=sys.stderr,
                    flush=True,
                )


def _exit(code: int) -> None:
    """End the process with ``code``.

    After the final or a preemption checkpoint, or a divergence, the process leaves with
    os._exit: interpreter teardown puts SIGTERM back to its default action, and torchrun SIGTERMs
    the ranks still running as soon as the first one exits, so a normal exit could turn a
    finished run, a clean preemption or a divergence into a death by signal. Everything worth
    keeping is durable and closed. An error path that left its process group behind leaves the
    same way: interpreter teardown would destroy the group, which can block just as
    destroy_process_group can.
    """
    left_behind = dist.is_available() and dist.is_initialized()
    if code in CLEAN_EXITS or left_behind:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    try:
        exit_code = main()
    except Exception:
        traceback.print_exc()  # what an uncaught exception prints; the exit must not wait either
        exit_code = 1
    _exit(exit_code)
