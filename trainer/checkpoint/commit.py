"""Write one snapshot as a committed checkpoint: temp directory, fsync, manifest last, rename.

Order (invariant 1, "valid or invisible"):

1. ``checkpoints/.tmp-step-XXXXXXXX-<host>-<pid>-<token>/`` is created;
2. each payload file is written, hashed in the same pass and fsync'd;
3. ``manifest.json`` (sizes and hashes of the payload) is written last and fsync'd;
4. the temp directory is fsync'd, renamed to ``step-XXXXXXXX`` and the parent fsync'd.

A kill before step 4's rename leaves only a temp directory, which readers never look at; after it
the directory is complete. On any error the temp directory is removed and the error re-raised.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import fsio, hashing, manifest
from .layout import MANIFEST, MODEL_FILE, OPTIM_FILE, STATE_FILE, TMP_PREFIX, step_name, work_name
from .state import Snapshot
from .tensorfile import write_safetensors


def write_checkpoint(
    ckpt_dir: Path, snap: Snapshot, file_hash: str = hashing.DEFAULT, durable: bool = True
) -> tuple[Path, dict]:
    """Commit ``snap`` under ``ckpt_dir`` and return ``(final path, manifest)``. ``file_hash``
    is the payload files' checksum; ``durable`` False skips every fsync (the memory tier,
    which a power cut empties anyway; the order of the steps still makes it atomic).

    Raises FileExistsError when ``step-XXXXXXXX`` already exists (the caller decides what to do),
    and OSError from the file system as-is; in both cases nothing of this save is left behind.
    """
    final = ckpt_dir / step_name(snap.step)
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    tmp = ckpt_dir / work_name(TMP_PREFIX, snap.step)
    tmp.mkdir()
    try:
        files: dict[str, dict] = {}
        # The model file goes first and carries the mid-file pause point: it is the large one.
        files[MODEL_FILE] = write_safetensors(
            tmp / MODEL_FILE,
            snap.model_tensors,
            pause_phase="payload-mid",
            algo=file_hash,
            durable=durable,
        )
        if snap.optim_tensors:
            files[OPTIM_FILE] = write_safetensors(
                tmp / OPTIM_FILE, snap.optim_tensors, algo=file_hash, durable=durable
            )
        state = {
            "model_aliases": snap.model_aliases,
            "optimizer": snap.optim_skeleton,
            "scaler": snap.scaler_state,
        }
        files[STATE_FILE] = fsio.write_file(
            tmp / STATE_FILE, json.dumps(state).encode(), algo=file_hash, durable=durable
        )
        man = manifest.build(
            snap.step,
            files,
            snap.params_digest(file_hash),
            snap.train_state,
            snap.meta,
            finite=not snap.nonfinite,
            file_hash=file_hash,
        )
        fsio.write_file(
            tmp / MANIFEST, manifest.to_bytes(man), pause_phase="manifest-mid", durable=durable
        )
        if durable:
            fsio.fsync_dir(tmp)
        fsio.pause_point("before-rename")
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsio.pause_point("after-rename")
    if durable:
        fsio.fsync_dir(ckpt_dir)
    return final, man
