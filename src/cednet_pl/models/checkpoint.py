"""The one checkpoint reader of cednet-pl (framework-free: torch only).

Every checkpoint the project reads goes through :func:`read_checkpoint` (the file as a dict) and
:func:`unwrap_state_dict` (the model weights inside it), or :func:`load_checkpoint_file` (both):

- a released ``.pth`` (``{'model': sd, ...}``; ``'model'`` is preferred over ``'model_ema'``), a bare state_dict,
  ``{'model': sd}``;
- a Lightning ``.ckpt`` written by cednet-train (``state_dict`` with the LightningModule's ``net.`` prefix, or the
  EMA copy under ``ema.module.``); a DDP ``module.`` prefix is stripped too.

Files are read with ``torch.load(weights_only=True)``: only tensors, plain containers and primitives are unpickled,
so a crafted file cannot run code. A file that needs full unpickling fails with a message naming it and the
explicit option a user sets when they trust it (``weights_only=False``; on the command line ``cednet-eval
allow_pickle=true`` or ``scripts/convert_checkpoint.py --allow-pickle``).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "CONFIG_KEY",
    "TRUST_HINT",
    "CheckpointReadError",
    "check_state_dict_keys",
    "is_lightning_checkpoint",
    "load_checkpoint_file",
    "load_pretrained_file",
    "local_file_overlay",
    "read_checkpoint",
    "unwrap_state_dict",
]

_logger = logging.getLogger(__name__)

#: Key under which cednet-train stores the run's model/data configs inside every Lightning checkpoint.
CONFIG_KEY = "cednet_config"

#: How a user loads a file they trust that weights-only loading refuses.
TRUST_HINT = (
    "If you trust the file, load it with weights_only=False: `cednet-eval ckpt=FILE allow_pickle=true`, or "
    "once with `scripts/convert_checkpoint.py --allow-pickle FILE OUT --model VARIANT`, which writes a "
    "weights-only copy OUT for every other use"
)


class CheckpointReadError(ValueError, RuntimeError):
    """A checkpoint file that cannot be read (empty, truncated, not a torch file, or refused by weights-only)."""


def read_checkpoint(path: str | os.PathLike, weights_only: bool = True) -> dict[str, Any]:
    """Read a checkpoint file on CPU and return the dict it holds.

    Args:
        path: A Lightning ``.ckpt``, a released ``.pth`` or a bare state_dict file.
        weights_only: Unpickle only tensors, plain containers and primitives (the default). ``False`` runs
            arbitrary code from the file: only for files you trust.

    Raises:
        FileNotFoundError: No such file.
        CheckpointReadError: Empty, truncated or non-torch file; objects weights-only loading refuses; not a dict.
    """
    path = os.fspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not os.path.isfile(path):
        raise CheckpointReadError(f"checkpoint {path} is not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointReadError(f"checkpoint {path} is empty (0 bytes): the file is truncated")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        # torch raises UnpicklingError for globals the weights-only unpickler refuses; a damaged pickle stream
        # raises it too, so both readings are named
        raise CheckpointReadError(
            f"checkpoint {path} could not be read with weights_only=True: it holds Python objects beyond tensors "
            f"and plain containers (or it is corrupt): {str(e).splitlines()[0]}. {TRUST_HINT}"
        ) from e
    except Exception as e:  # torch raises many types for damaged files; all of them mean "unreadable"
        raise CheckpointReadError(
            f"checkpoint {path} could not be read ({type(e).__name__}: {e}); the file is truncated, corrupt "
            "or not a torch checkpoint"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(
            f"checkpoint {path} holds a {type(obj).__name__}, expected a dict (a state_dict or a checkpoint)"
        )
    return dict(obj)


def is_lightning_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    """Whether a loaded checkpoint was written by Lightning."""
    return "state_dict" in ckpt and ("pytorch-lightning_version" in ckpt or "global_step" in ckpt)


def _strip(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def unwrap_state_dict(ckpt: Any, source: str = "checkpoint", ema: bool = False) -> dict[str, torch.Tensor]:
    """Return the model state_dict inside a loaded checkpoint (see the module docstring for the layouts).

    Args:
        ckpt: The loaded checkpoint.
        source: Name of the file, for messages.
        ema: From a Lightning checkpoint, take the EMA weights (``ema.module.*``) instead of the raw ones
            (``net.*``).

    Raises:
        RuntimeError: No state_dict of tensors found (or no EMA weights when ``ema`` is asked for).
    """
    if not isinstance(ckpt, Mapping):
        raise RuntimeError(f"{source}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if isinstance(ckpt.get("model"), Mapping):
        sd = ckpt["model"]
    elif isinstance(ckpt.get("state_dict"), Mapping):
        sd = ckpt["state_dict"]
        prefix = "ema.module." if ema else "net."
        if ema and not any(k.startswith(prefix) for k in sd):
            raise RuntimeError(f"{source}: the checkpoint has no EMA weights (`ema.module.*`)")
        if any(k.startswith(prefix) for k in sd):
            dropped = [k for k in sd if not k.startswith(prefix)]
            if dropped:
                _logger.info(
                    "%s: ignoring %d non-model Lightning keys (e.g. %s)", source, len(dropped), dropped[:3]
                )
            sd = _strip(sd, prefix)
    elif isinstance(ckpt.get("model_ema"), Mapping):
        sd = ckpt["model_ema"]
    else:
        sd = ckpt
    if sd and all(k.startswith("module.") for k in sd):
        sd = _strip(sd, "module.")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not sd or bad:
        raise RuntimeError(
            f"{source}: no model state_dict found (top-level keys {list(ckpt)[:10]}"
            + (f"; non-tensor entries {bad[:10]}" if bad else "")
            + ")"
        )
    return dict(sd)


def load_checkpoint_file(
    path: str | os.PathLike, weights_only: bool = True, ema: bool = False
) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its bare model state_dict (keys not yet validated against a model).

    Raises:
        FileNotFoundError: No such file.
        CheckpointReadError: See :func:`read_checkpoint`.
        RuntimeError: The file holds no state_dict.
    """
    return unwrap_state_dict(
        read_checkpoint(path, weights_only=weights_only), source=os.fspath(path), ema=ema
    )


def _mismatch_message(variant: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    """The error text for a state_dict that does not fit ``variant``: counts and the first names per kind."""
    lines = [f"checkpoint does not match {variant} (is it a checkpoint of another variant?):"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            lines.append(
                f"  {len(items)} {title} keys: " + ", ".join(items[:10]) + (" ..." if len(items) > 10 else "")
            )
    return "\n".join(lines)


def check_state_dict_keys(
    sd: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    variant: str,
    optional: Sequence[str] = (),
) -> None:
    """Raise ``RuntimeError`` naming every missing (except ``optional``), unexpected and mis-shaped key.

    Args:
        sd: The checkpoint's state_dict (after a model's filter has adapted it).
        expected: ``{key: shape}`` of the model's state_dict.
        variant: Model name for the message.
        optional: Keys the checkpoint may lack (they keep their fresh initialisation).
    """
    skip = set(optional)
    missing = [k for k in expected if k not in sd and k not in skip]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k])}"
        for k in sd
        if k in expected and sd[k].shape != expected[k]
    ]
    if missing or unexpected or mismatched:
        raise RuntimeError(_mismatch_message(variant, missing, unexpected, mismatched))


FilterFn = Callable[[Mapping[str, Any], torch.nn.Module], dict[str, torch.Tensor]]


def load_pretrained_file(model: torch.nn.Module, path: str, filter_fn: FilterFn) -> None:
    """Load a local checkpoint file into ``model`` through a model family's ``filter_fn`` (its strict key check);
    the body of every family's ``model.load_pretrained`` hook."""
    sd = filter_fn(load_checkpoint_file(path), model)
    result = model.load_state_dict(sd, strict=False)
    _logger.info("loaded %s (%d tensors; fresh init: %s)", path, len(sd), result.missing_keys[:10])


def local_file_overlay(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Pop ``pretrained_cfg_overlay`` from timm ``create_model`` kwargs; a local ``file`` is then loaded by the
    model's own ``load_pretrained`` (this module's reader: clear errors, Lightning/released wrappers), not timm's."""
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if overlay.get("file"):
        overlay.setdefault("custom_load", True)
    return overlay or None
