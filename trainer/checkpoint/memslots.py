"""The memory tier's writer: two slots, rewritten in place.

A memory snapshot has a disk checkpoint's layout, so the same ``verify`` and loader read it. But
writing one anew each time cost several times the copy itself: a fresh host copy of every tensor,
new files whose pages fault in, a serialiser that walks every tensor. A slot keeps its safetensors
files mapped for the life of the process, so a snapshot is one batched copy into them, a hash at
memory speed, and two small JSON files. The commit keeps the disk order (invariant 1, "valid or
invisible"):

1. the slot's directory (the older snapshot) takes a temp name and loses its manifest;
2. the tensors are copied into its mapped files, which are then hashed;
3. ``state.json`` and ``manifest.json`` are written;
4. the directory is renamed to ``step-XXXXXXXX``.

A kill before 4 leaves a temp directory (the next writer removes it); the other slot, which holds
the newest snapshot, is not touched. A slot whose tensors changed in name, shape or dtype is made
anew. The files are allocated in full when a slot is made: a full shared-memory root then fails
that call with ENOSPC, never a later write into the mapping with SIGBUS.

The checks run on the copies, where they are cheapest: the parameters' digest is one hash over
their bytes in the model file (runs of adjacent tensors merged), and the non-finite check one sum
per run of same-dtype parameters and optimizer tensors. A sum that is not finite (a NaN, an
infinity, or finite values that overflow it) is checked tensor by tensor; a snapshot that truly
holds one is refused (:class:`NonFiniteSnapshot`), since a resume from it would diverge.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runcontract.layout import parse_step

from . import fsio, hashing, manifest
from .layout import MANIFEST, MODEL_FILE, OPTIM_FILE, STATE_FILE, TMP_PREFIX, step_name, work_name
from .state import Snapshot, nonfinite_names
from .tensorfile import header, host_bytes

#: Snapshots kept: the newest, and the slot the next one is written into.
SLOTS = 2

_Layout = tuple[tuple[str, str, torch.dtype, tuple[int, ...]], ...]
#: What a slot is made for: its tensors, and which of the model's are the parameters, in order.
_Key = tuple[_Layout, tuple[str, ...]]
#: Sums in float32 for these: a half-precision sum would overflow long before its values do.
_WIDEN = (torch.float16, torch.bfloat16)


class NonFiniteSnapshot(Exception):
    """The snapshot holds a NaN or an infinity in these parameter or optimizer tensors."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"non-finite values in {', '.join(names[:5])}")
        self.names = names


@dataclass
class _MappedFile:
    size: int
    data: torch.Tensor  #: the whole file, mapped (uint8)
    views: dict[str, torch.Tensor]  #: each tensor's bytes in it, typed and shaped
    spans: dict[str, tuple[int, int]]  #: each tensor's byte range in the file


@dataclass
class _Slot:
    path: Path  #: its directory: committed (``step-XXXXXXXX``) or being written (temp name)
    key: _Key
    files: dict[str, _MappedFile]
    dst: list[torch.Tensor]  #: every tensor's view, in the snapshot's order
    dst_bytes: list[memoryview]  #: the same, as bytes
    param_bytes: list[memoryview]  #: the parameters' bytes, in order, adjacent ones merged
    judged: list[torch.Tensor]  #: flat runs of the parameters and optimizer tensors
    judged_views: list[tuple[str, torch.Tensor]]  #: the same tensors, one by one


def _payload(snap: Snapshot) -> dict[str, dict[str, torch.Tensor]]:
    files = {MODEL_FILE: snap.model_tensors}
    if snap.optim_tensors:
        files[OPTIM_FILE] = snap.optim_tensors
    return files


def _key(snap: Snapshot) -> _Key:
    layout = tuple(
        (file, name, t.dtype, tuple(t.shape))
        for file, tensors in _payload(snap).items()
        for name, t in tensors.items()
    )
    return layout, tuple(snap.model_aliases.get(n, n) for n in snap.param_names)


def _runs(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` with each one that starts where the one before it ends merged into it."""
    runs: list[tuple[int, int]] = []
    for start, end in spans:
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def _judged_runs(mapped: _MappedFile, names: set[str] | None) -> list[torch.Tensor]:
    """Flat typed views over the floating-point tensors of ``mapped`` that are judged (all of
    them when ``names`` is None), each over a run of adjacent tensors of one dtype."""
    runs: list[tuple[torch.dtype, int, int]] = []
    for name, view in mapped.views.items():
        judged = names is None or name in names
        if not judged or not view.is_floating_point() or not view.numel():
            continue
        start, end = mapped.spans[name]
        if runs and runs[-1][0] == view.dtype and runs[-1][2] == start:
            runs[-1] = (view.dtype, runs[-1][1], end)
        else:
            runs.append((view.dtype, start, end))
    return [mapped.data[start:end].view(dtype) for dtype, start, end in runs]


def _all_finite(runs: list[torch.Tensor]) -> bool:
    """True when every run sums to a finite number: then none holds a NaN or an infinity."""
    if not runs:
        return True
    sums = [r.sum(dtype=torch.float32) if r.dtype in _WIDEN else r.sum() for r in runs]
    return bool(torch.isfinite(torch.stack([s.float() for s in sums])).all())


def _map_file(path: Path, tensors: dict[str, torch.Tensor]) -> _MappedFile:
    """Create ``path`` as a safetensors file for ``tensors`` (their bytes still zero), allocated
    in full, and map it. Raises OSError (ENOSPC included) and ValueError (a dtype the format does
    not store, a tensor whose offset its dtype cannot be viewed at)."""
    head, spans = header(tensors)
    size = len(head) + (spans[-1][1] if spans else 0)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        os.pwrite(fd, head, 0)
    finally:
        os.close(fd)
    data = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
    views, at = {}, {}
    for (name, t), (start, end) in zip(tensors.items(), spans, strict=True):
        at[name] = (len(head) + start, len(head) + end)
        raw = data[at[name][0] : at[name][1]]
        try:
            views[name] = raw.view(t.dtype).view(t.shape)
        except RuntimeError as e:  # safetensors packs tensors with no padding between them
            raise ValueError(f"tensor {name!r} cannot be mapped at its offset: {e}") from e
    return _MappedFile(size, data, views, at)


def _copy_into(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    try:
        torch._foreach_copy_(dst, src)  # one call for all, not one per tensor
    except RuntimeError:  # tensors on several devices, or a kind foreach does not take
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


def _source_bytes(src: list[torch.Tensor]) -> list[memoryview] | None:
    """Every tensor of ``src`` as its bytes in place, or None when one is not on the host or
    not contiguous (those are copied by torch)."""
    try:
        return [host_bytes(t.detach()) for t in src]
    except ValueError:
        return None


class SlotWriter:
    """Writes snapshots into at most :data:`SLOTS` slot directories under ``mem_dir``.

    ``ensure_room(nbytes)`` is called before a slot is made (raise OSError when the root cannot
    take ``nbytes``); a slot that is rewritten takes no more room.
    """

    def __init__(self, mem_dir: Path, ensure_room: Callable[[int], None]) -> None:
        self.dir = mem_dir
        self.ensure_room = ensure_room
        self.slots: list[_Slot] = []
        self._last_key: tuple[dict, dict, _Key, list[memoryview] | None] | None = None
        self._state_json: tuple[Any, str] | None = None

    def commit(self, snap: Snapshot, file_hash: str = hashing.FAST) -> Path:
        """Commit ``snap`` (the live tensors: they are copied here) as ``step-XXXXXXXX`` and
        return its path. Raises OSError, ValueError and :class:`NonFiniteSnapshot`; nothing of
        this snapshot is then left visible, and the newest earlier one is untouched."""
        key, src_bytes = self._key_of(snap)
        committed = self._committed()
        newest = committed[0][1] if committed else None
        reusable = [s for s in self.slots if s.path != newest and s.key == key]
        slot = reusable[0] if reusable else None
        for _, path in committed:
            if path not in (newest, slot.path if slot else None):
                self._forget(path)
                shutil.rmtree(path)
        tmp = self.dir / work_name(TMP_PREFIX, snap.step)
        try:
            if slot is None:
                slot = self._make(tmp, snap, key)
            else:
                os.rename(slot.path, tmp)
                slot.path = tmp
                for name in os.listdir(tmp):  # manifest first: without it nothing verifies
                    if name not in slot.files:
                        os.unlink(tmp / name)
            return self._write(slot, snap, file_hash, src_bytes)
        except BaseException:
            if slot is not None:
                self._forget(slot.path)
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _committed(self) -> list[tuple[int, Path]]:
        """``step_dirs(self.dir)``, and the slots not among them forgotten (dropped by a
        rollback, or by hand). A name this writer committed is known to be its directory;
        only another name costs a stat."""
        mine = {s.path.name: s.path for s in self.slots}
        committed = []
        for name in os.listdir(self.dir):
            step = parse_step(name)
            if step is None:
                continue
            path = mine.get(name) or self.dir / name
            if name in mine or path.is_dir():
                committed.append((step, path))
        committed.sort(reverse=True)
        on_disk = {path for _, path in committed}
        self.slots = [s for s in self.slots if s.path in on_disk]
        return committed

    def _key_of(self, snap: Snapshot) -> tuple[_Key, list[memoryview] | None]:
        """The slot key of ``snap``, and its tensors' bytes in place (None: copied by torch).
        Snapshots from one plan (``liveplan``) share their tensor dicts, which hold the same
        tensors at the same storage: both are known."""
        last = self._last_key
        if last is not None and last[0] is snap.model_tensors and last[1] is snap.optim_tensors:
            return last[2], last[3]
        src = _source_bytes([t for tensors in _payload(snap).values() for t in tensors.values()])
        self._last_key = (snap.model_tensors, snap.optim_tensors, _key(snap), src)
        return self._last_key[2], src

    def _state_bytes(self, snap: Snapshot) -> bytes:
        """``state.json``: the model's aliases, the optimizer's skeleton and the scaler's state.
        The skeleton's ``state`` part (every tensor's name) is the same object in snapshots of
        one plan, and is encoded once; its ``param_groups`` (the learning rate) change."""
        skeleton = snap.optim_skeleton
        if not isinstance(skeleton, dict) or not isinstance(skeleton.get("state"), dict):
            return json.dumps(
                {
                    "model_aliases": snap.model_aliases,
                    "optimizer": skeleton,
                    "scaler": snap.scaler_state,
                }
            ).encode()
        cached = self._state_json
        if cached is None or cached[0] is not skeleton["state"]:
            cached = self._state_json = (skeleton["state"], json.dumps(skeleton["state"]))
        optimizer = ", ".join(
            f"{json.dumps(k)}: {cached[1] if k == 'state' else json.dumps(v)}"
            for k, v in skeleton.items()
        )
        return (
            f'{{"model_aliases": {json.dumps(snap.model_aliases)}, "optimizer": {{{optimizer}}}, '
            f'"scaler": {json.dumps(snap.scaler_state)}}}'
        ).encode()

    def _forget(self, path: Path) -> None:
        self.slots = [s for s in self.slots if s.path != path]

    def _make(self, tmp: Path, snap: Snapshot, key: _Key) -> _Slot:
        self.ensure_room(snap.nbytes)
        tmp.mkdir()
        files = {name: _map_file(tmp / name, tensors) for name, tensors in _payload(snap).items()}
        model = files[MODEL_FILE]
        params = _runs([model.spans[name] for name in key[1]])
        judged = _judged_runs(model, set(key[1]))
        judged_views = [(name, model.views[name]) for name in key[1]]
        if OPTIM_FILE in files:
            judged += _judged_runs(files[OPTIM_FILE], None)
            judged_views += list(files[OPTIM_FILE].views.items())
        slot = _Slot(
            tmp,
            key,
            files,
            dst=[v for mapped in files.values() for v in mapped.views.values()],
            dst_bytes=[
                memoryview(mapped.data[a:b].numpy())  # type: ignore[arg-type]
                for mapped in files.values()
                for a, b in mapped.spans.values()
            ],
            param_bytes=[memoryview(model.data[a:b].numpy()) for a, b in params],  # type: ignore[arg-type]
            judged=judged,
            judged_views=judged_views,
        )
        self.slots.append(slot)
        return slot

    def _write(
        self, slot: _Slot, snap: Snapshot, file_hash: str, src_bytes: list[memoryview] | None
    ) -> Path:
        if src_bytes is not None:
            # A memcpy per tensor: less overhead than torch's copy, which dispatches per tensor.
            for dst, src in zip(slot.dst_bytes, src_bytes, strict=True):
                dst[:] = src
        else:
            tensors = [t for named in _payload(snap).values() for t in named.values()]
            with torch.no_grad():
                _copy_into(slot.dst, tensors)
        if not _all_finite(slot.judged):
            # Exact, tensor by tensor, on the copies: the sum may only have overflowed.
            bad = nonfinite_names(slot.judged_views)
            if bad:
                raise NonFiniteSnapshot(bad)
        files: dict[str, dict] = {}
        for name, mapped in slot.files.items():
            h = hashing.new(file_hash)
            h.update(memoryview(mapped.data.numpy()))  # type: ignore[arg-type]
            files[name] = {"size": mapped.size, file_hash: h.hexdigest()}
        digest = hashing.new(file_hash)
        for run in slot.param_bytes:
            digest.update(run)
        files[STATE_FILE] = fsio.write_file(
            slot.path / STATE_FILE, self._state_bytes(snap), algo=file_hash, durable=False
        )
        body = manifest.build(
            snap.step,
            files,
            digest.hexdigest(),
            snap.train_state,
            snap.meta,
            finite=True,  # a snapshot that is not was refused above
            file_hash=file_hash,
            sealed=False,
        )
        man = manifest.compact_bytes(body)
        fsio.write_file(slot.path / MANIFEST, man, pause_phase="manifest-mid", durable=False)
        fsio.pause_point("before-rename")
        final = self.dir / step_name(snap.step)
        if final.exists():  # rename would replace an empty directory silently
            raise FileExistsError(f"{final} already exists")
        os.rename(slot.path, final)
        slot.path = final
        fsio.pause_point("after-rename")
        return final
