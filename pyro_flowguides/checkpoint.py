"""Checkpoints of Pyro's param store, a Pyro optimizer and the random-number generators.

A checkpoint holds only tensors and plain containers, so it is read with
``torch.load(weights_only=True)``: opening one runs no code from the file. What it holds:

* the param store's *unconstrained* values, keyed by name (constraints are objects, not
  weights, so they are taken from the live store on loading);
* the optimizer's state (:meth:`pyro.optim.PyroOptim.get_state`, learning rates included);
* the states of torch's (CPU and CUDA), Python's and NumPy's generators;
* the step number and ``extra``: any weights_only-safe values (a training history, say).

Files are written to a temporary file in the same folder and renamed over the old one
(``os.replace``), so a crash or Ctrl-C while writing leaves the previous checkpoint intact.
Loading checks the whole file first (readable, the expected format, a SHA-256 checksum of the
contents, which catches damage inside tensor data that ``torch.load`` would read silently, and the
same parameter names and shapes as the live param store) and changes nothing when a check fails.

>>> import pyro, tempfile, torch, os
>>> pyro.clear_param_store()
>>> _ = pyro.param("w", torch.ones(2))
>>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
>>> save_checkpoint(path, step=5)
>>> with torch.no_grad():
...     _ = pyro.param("w").unconstrained().zero_()
>>> load_checkpoint(path).step, pyro.param("w")
(5, tensor([1., 1.], requires_grad=True))
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import pyro.util
import torch
from pyro.optim import PyroOptim
from torch import Tensor

FORMAT = "pyro_flowguides.checkpoint"
VERSION = 1
_KEYS = ("format", "version", "step", "params", "optim", "rng", "extra", "checksum")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, corrupted, unsafe or of another format."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose parameters do not match the live model and guide."""


# -- random-number generators ---------------------------------------------------------------------


def get_rng_state() -> dict:
    """The states of torch's (CPU, and CUDA once initialised), Python's and NumPy's generators.

    Pyro's :func:`pyro.util.get_rng_state` plus CUDA; cheap enough to take before every step.
    """
    state = pyro.util.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def portable_rng_state(state: Mapping) -> dict:
    """``state`` (from :func:`get_rng_state`) with NumPy's key array as a tensor: weights_only-safe."""
    kind, keys, position, has_gauss, cached = state["numpy"]
    if isinstance(keys, np.ndarray):
        keys = torch.from_numpy(keys.astype(np.int64))
    return {**state, "numpy": (kind, keys, position, has_gauss, cached)}


def set_rng_state(state: Mapping) -> None:
    """Restore generators from :func:`get_rng_state` or :func:`portable_rng_state`.

    A CUDA state is restored where as many CUDA devices exist, and ignored otherwise.
    """
    kind, keys, position, has_gauss, cached = state["numpy"]
    if isinstance(keys, Tensor):
        keys = keys.numpy().astype(np.uint32)
    pyro.util.set_rng_state(
        {
            "torch": state["torch"],
            "random": state["random"],
            "numpy": (kind, keys, position, has_gauss, cached),
        }
    )
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


# -- the param store ------------------------------------------------------------------------------


def param_fingerprint(params: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}``: what must match for values to be loaded into a param store."""
    return {name: (tuple(value.shape), str(value.dtype)) for name, value in params.items()}


def _live_params() -> dict[str, Tensor]:
    return dict(pyro.get_param_store().named_parameters())


def _mismatches(saved: Mapping[str, Tensor], live: Mapping[str, Tensor]) -> list[str]:
    saved_fp, live_fp = param_fingerprint(saved), param_fingerprint(live)
    out = [f"{name!r} is in the checkpoint but not in the param store" for name in saved_fp.keys() - live_fp]
    out += [f"{name!r} is in the param store but not in the checkpoint" for name in live_fp.keys() - saved_fp]
    out += [
        f"{name!r} has shape {saved_fp[name][0]} ({saved_fp[name][1]}) in the checkpoint but "
        f"{live_fp[name][0]} ({live_fp[name][1]}) in the param store"
        for name in saved_fp.keys() & live_fp
        if saved_fp[name] != live_fp[name]
    ]
    return sorted(out)


_PLAIN = (int, float, str, bool, type(None))


def checksum(contents: object) -> str:
    """SHA-256 of nested dicts, lists, tuples, tensors (dtype, shape and bytes) and plain values.

    Anything else (which ``torch.load(weights_only=True)`` would refuse) is a ``TypeError`` naming
    where it is.
    """
    digest = hashlib.sha256()

    def feed(value: object, where: str) -> None:
        if isinstance(value, Tensor):
            flat = value.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            digest.update(f"D{len(value)}".encode())
            for key, item in value.items():
                feed(key, where)
                feed(item, f"{where}[{key!r}]")
        elif isinstance(value, list | tuple):
            digest.update(f"L{len(value)}".encode())
            for index, item in enumerate(value):
                feed(item, f"{where}[{index}]")
        elif isinstance(value, _PLAIN):
            digest.update(f"V{value!r}".encode())
        else:
            raise TypeError(
                f"checkpoint entry {where} is a {type(value).__name__}; a checkpoint holds only tensors, "
                f"numbers, strings, None and dicts, lists and tuples of them (weights_only-safe)"
            )

    feed(contents, "contents")
    return digest.hexdigest()


# -- files ----------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """The validated contents of a checkpoint file; nothing applied until :meth:`restore`."""

    path: Path
    step: int
    params: dict[str, Tensor]
    optim: dict
    rng: dict
    extra: dict = field(default_factory=dict)

    def check_matches_param_store(self) -> None:
        """Raise :class:`CheckpointMismatchError` unless the live param store has exactly these
        parameter names, shapes and dtypes."""
        live = _live_params()
        if not live:
            raise CheckpointMismatchError(
                f"cannot load {self.path}: Pyro's param store is empty. Run the model and guide once "
                f"(e.g. guide(*args)) so that their parameters exist, then load; fit(resume_from=...) "
                f"does this for you."
            )
        problems = _mismatches(self.params, live)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise CheckpointMismatchError(
                f"{self.path} was saved from another model or guide: {shown}. Build the same model "
                f"and guide (same flow, num_flows and options) before loading, or start a new run."
            )

    def restore(self, optim: PyroOptim | None = None, *, rng: bool = True) -> None:
        """Copy the parameters into the live param store, hand ``optim`` its state and (``rng``)
        restore the generators. Checks the parameters first and changes nothing if they differ."""
        self.check_matches_param_store()
        live = _live_params()
        with torch.no_grad():
            for name, value in self.params.items():
                live[name].copy_(value)
        if optim is not None:
            optim.set_state(self.optim)
        if rng:
            set_rng_state(self.rng)


def save_checkpoint(
    path: str | os.PathLike,
    optim: PyroOptim | None = None,
    *,
    step: int = 0,
    extra: Mapping | None = None,
    rng: Mapping | None = None,
) -> None:
    """Write the param store, ``optim``'s state, the generators' states (``rng``, default now),
    ``step`` and ``extra`` to ``path``, atomically (temporary file, then ``os.replace``)."""
    params = {name: value.detach().to("cpu", copy=True) for name, value in _live_params().items()}
    optim_state = {}
    if optim is not None:
        # state loaded with set_state but not yet consumed by a step belongs to the run as well
        optim_state = {**optim._state_waiting_to_be_consumed, **optim.get_state()}
    contents = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "params": params,
        "optim": optim_state,
        "rng": portable_rng_state(get_rng_state() if rng is None else rng),
        "extra": dict(extra or {}),
    }
    contents["checksum"] = checksum(contents)
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(contents, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate ``path`` with ``torch.load(weights_only=True)``, applying nothing.

    Raises :class:`CheckpointError` for a truncated, corrupted or unsafe file or another format,
    ``FileNotFoundError`` when there is no file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects other than tensors and plain "
                f"containers, which could run code when loaded. Only load checkpoints written by "
                f"save_checkpoint (or fit)."
            ) from error
        raise _corrupt(path, error) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise _corrupt(path, error) from error
    if not isinstance(contents, dict) or contents.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a pyro_flowguides checkpoint (no 'format': {FORMAT!r} entry); "
            f"it was written by something other than save_checkpoint."
        )
    missing = [key for key in _KEYS if key not in contents]
    if contents.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is a pyro_flowguides checkpoint of version {contents.get('version')!r}; "
            f"this version of pyro_flowguides reads version {VERSION}."
        )
    if missing:
        raise _corrupt(path, KeyError(f"missing entries {', '.join(missing)}"))
    stored = contents.pop("checksum")
    if checksum(contents) != stored:
        raise _corrupt(path, ValueError("its contents do not match the checksum written with them"))
    return Checkpoint(
        path=path,
        step=contents["step"],
        params=contents["params"],
        optim=contents["optim"],
        rng=contents["rng"],
        extra=contents["extra"],
    )


def _corrupt(path: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path} is truncated or corrupted and was not loaded ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else 'no detail'}); nothing was changed. "
        f"Load an earlier checkpoint or start the run again."
    )


def load_checkpoint(
    path: str | os.PathLike, optim: PyroOptim | None = None, *, rng: bool = True
) -> Checkpoint:
    """:func:`read_checkpoint` then :meth:`Checkpoint.restore`; returns the checkpoint (for its
    ``step`` and ``extra``)."""
    checkpoint = read_checkpoint(path)
    checkpoint.restore(optim, rng=rng)
    return checkpoint
