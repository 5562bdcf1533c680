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
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import fsio, hashing, manifest
from .integrity import step_dirs
from .layout import MANIFEST, MODEL_FILE, OPTIM_FILE, STATE_FILE, TMP_PREFIX, step_name, work_name
from .state import Snapshot
from .tensorfile import header

#: Snapshots kept: the newest, and the slot the next one is written into.
SLOTS = 2

_Layout = tuple[tuple[str, str, torch.dtype, tuple[int, ...]], ...]


@dataclass
class _MappedFile:
    size: int
    data: torch.Tensor  #: the whole file, mapped (uint8)
    views: dict[str, torch.Tensor]  #: each tensor's bytes in it, typed and shaped


@dataclass
class _Slot:
    path: Path  #: its directory: committed (``step-XXXXXXXX``) or being written (temp name)
    layout: _Layout
    files: dict[str, _MappedFile]


def _payload(snap: Snapshot) -> dict[str, dict[str, torch.Tensor]]:
    files = {MODEL_FILE: snap.model_tensors}
    if snap.optim_tensors:
        files[OPTIM_FILE] = snap.optim_tensors
    return files


def _layout(snap: Snapshot) -> _Layout:
    return tuple(
        (file, name, t.dtype, tuple(t.shape))
        for file, tensors in _payload(snap).items()
        for name, t in tensors.items()
    )


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
    views = {}
    for (name, t), (start, end) in zip(tensors.items(), spans, strict=True):
        raw = data[len(head) + start : len(head) + end]
        try:
            views[name] = raw.view(t.dtype).view(t.shape)
        except RuntimeError as e:  # safetensors packs tensors with no padding between them
            raise ValueError(f"tensor {name!r} cannot be mapped at its offset: {e}") from e
    return _MappedFile(size, data, views)


def _copy_into(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    try:
        torch._foreach_copy_(dst, src)  # one call for all, not one per tensor
    except RuntimeError:  # tensors on several devices, or a kind foreach does not take
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


class SlotWriter:
    """Writes snapshots into at most :data:`SLOTS` slot directories under ``mem_dir``.

    ``ensure_room(nbytes)`` is called before a slot is made (raise OSError when the root cannot
    take ``nbytes``); a slot that is rewritten takes no more room.
    """

    def __init__(self, mem_dir: Path, ensure_room: Callable[[int], None]) -> None:
        self.dir = mem_dir
        self.ensure_room = ensure_room
        self.slots: list[_Slot] = []

    def commit(self, snap: Snapshot, file_hash: str = hashing.FAST) -> Path:
        """Commit ``snap`` (the live tensors: they are copied here) as ``step-XXXXXXXX`` and
        return its path. Raises OSError and ValueError; nothing of this snapshot is then left
        visible, and the newest earlier one is untouched."""
        layout = _layout(snap)
        self.slots = [s for s in self.slots if s.path.is_dir()]  # dropped by a rollback, by hand
        committed = step_dirs(self.dir)
        newest = committed[0][1] if committed else None
        reusable = [s for s in self.slots if s.path != newest and s.layout == layout]
        slot = reusable[0] if reusable else None
        for _, path in committed:
            if path not in (newest, slot.path if slot else None):
                self._forget(path)
                shutil.rmtree(path)
        tmp = self.dir / work_name(TMP_PREFIX, snap.step)
        try:
            if slot is None:
                slot = self._make(tmp, snap, layout)
            else:
                os.rename(slot.path, tmp)
                slot.path = tmp
                for name in os.listdir(tmp):  # manifest first: without it nothing verifies
                    if name not in slot.files:
                        os.unlink(tmp / name)
            return self._write(slot, snap, file_hash)
        except BaseException:
            if slot is not None:
                self._forget(slot.path)
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _forget(self, path: Path) -> None:
        self.slots = [s for s in self.slots if s.path != path]

    def _make(self, tmp: Path, snap: Snapshot, layout: _Layout) -> _Slot:
        self.ensure_room(snap.nbytes)
        tmp.mkdir()
        files = {name: _map_file(tmp / name, tensors) for name, tensors in _payload(snap).items()}
        slot = _Slot(tmp, layout, files)
        self.slots.append(slot)
        return slot

    def _write(self, slot: _Slot, snap: Snapshot, file_hash: str) -> Path:
        payload = _payload(snap)
        dst = [v for name in payload for v in slot.files[name].views.values()]
        src = [t.detach() for tensors in payload.values() for t in tensors.values()]
        with torch.no_grad():
            _copy_into(dst, src)
        files: dict[str, dict] = {}
        for name, mapped in slot.files.items():
            h = hashing.new(file_hash)
            h.update(memoryview(mapped.data.numpy()))  # type: ignore[arg-type]
            files[name] = {"size": mapped.size, file_hash: h.hexdigest()}
        host = dataclasses.replace(  # the same snapshot, its tensors now the mapped copies
            snap,
            model_tensors=slot.files[MODEL_FILE].views,
            optim_tensors=slot.files[OPTIM_FILE].views if OPTIM_FILE in slot.files else {},
        )
        state = {
            "model_aliases": host.model_aliases,
            "optimizer": host.optim_skeleton,
            "scaler": host.scaler_state,
        }
        files[STATE_FILE] = fsio.write_file(
            slot.path / STATE_FILE, json.dumps(state).encode(), algo=file_hash, durable=False
        )
        man = manifest.build(
            host.step,
            files,
            host.params_digest(file_hash),
            host.train_state,
            host.meta,
            finite=not snap.nonfinite,  # the live tensors', judged once by the caller
            file_hash=file_hash,
        )
        fsio.write_file(
            slot.path / MANIFEST,
            manifest.to_bytes(man),
            pause_phase="manifest-mid",
            durable=False,
        )
        fsio.pause_point("before-rename")
        final = self.dir / step_name(snap.step)
        if final.exists():  # rename would replace an empty directory silently
            raise FileExistsError(f"{final} already exists")
        os.rename(slot.path, final)
        slot.path = final
        fsio.pause_point("after-rename")
        return final
