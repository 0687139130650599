"""Lightning-side checkpoint helpers: atomic writes and resume-path resolution.

Reading checkpoints is `cednet_pl.models.checkpoint` (one weights-only reader for every file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cednet_pl.models.checkpoint import CONFIG_KEY
from cednet_pl.utils.logging import RankedLogger

__all__ = ["CONFIG_KEY", "AtomicCheckpointIO", "checkpoint_dir", "resolve_ckpt_path"]

log = RankedLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that never leaves a partially written checkpoint behind.

    Lightning writes through an fsspec transaction whose temporary file lives in the system temp dir, so the final
    `shutil.move` falls back to copy-into-place (not atomic) when that dir is on another filesystem, and nothing is
    fsynced. Here local checkpoints are written to a temporary file in the target directory, fsynced, then
    `os.replace`d over the destination: a crash leaves either the old file or the new one. Remote paths fall back to
    Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} does not support storage_options, got {storage_options!r}"
            )
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        try:
            dir_fd = os.open(target.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Directory holding a run's checkpoints."""
    return Path(output_dir) / "checkpoints"


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """Turn the `ckpt_path` config value into a checkpoint file (or None to start fresh).

    Args:
        ckpt_path: `None`/"none" (start fresh), "auto" (resume from the newest of `last.ckpt` / `hpc_ckpt_*.ckpt`
            in the run dir if one exists, else start fresh), "last" (resume from `checkpoints/last.ckpt`, which must
            exist) or a path to a checkpoint file.
        output_dir: The run's output dir (`paths.output_dir`).

    Returns:
        The checkpoint path to pass to `Trainer.fit`, or None.
    """
    if ckpt_path is None or str(ckpt_path).lower() in ("", "none", "null"):
        return None
    output_dir = Path(output_dir)
    last = checkpoint_dir(output_dir) / "last.ckpt"
    if ckpt_path == "auto":
        candidates = [p for p in [last, *output_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        if not candidates:
            return None
        newest = max(candidates, key=lambda p: p.stat().st_mtime)
        log.info(f"ckpt_path=auto: resuming from {newest}")
        return str(newest)
    if ckpt_path == "last":
        if not last.is_file():
            raise FileNotFoundError(
                f"ckpt_path=last but {last} does not exist; reuse the interrupted run's dir with "
                f"`hydra.run.dir=<run dir>` or pass ckpt_path=<file>"
            )
        return str(last)
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
    return str(path)
