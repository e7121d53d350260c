r"""``fit``: SVI training with progress, KL warm-up, early stopping, checkpoints and NaN safety.

``fit(model, guide, *args, num_steps=...)`` (or ``data=loader, epochs=...``) runs the steps of
:class:`pyro.infer.SVI` itself, decomposed so that nothing non-finite is ever applied: the loss
and gradients are computed, checked, clipped, and only then handed to the optimizer. It works
with any guide and any Pyro ELBO.

>>> import pyro, pyro.distributions as dist, torch
>>> from pyro.infer.autoguide import AutoNormal
>>> def model(x):
...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
...     with pyro.plate("data", len(x)):
...         pyro.sample("x", dist.Normal(mu, 1.0), obs=x)
>>> pyro.clear_param_store()
>>> history = fit(model, AutoNormal(model), torch.full((20,), 3.0), num_steps=300,
...               optim=pyro.optim.Adam({"lr": 0.05}), progress=False)
>>> len(history.loss), history.loss[-1] < history.loss[0]
(300, True)
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.util import zero_grads
from pyro.optim import PyroLRScheduler, PyroOptim
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointMismatchError,
    get_rng_state,
    portable_rng_state,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from .draws import max_plate_nesting

__all__ = [
    "FitHistory",
    "ModelStructureError",
    "NonFiniteLossError",
    "ScaleLatents",
    "SyncFreeTrace_ELBO",
    "fit",
    "kl_warmup_weight",
]


# -- KL warm-up -----------------------------------------------------------------------------------


def kl_warmup_weight(t: int, warmup: int) -> float:
    """``β_t = min(1, (t + 1) / warmup)`` for the ``t``-th step or epoch (from 0); 1 without warm-up.

    The linear warm-up of van den Berg et al. (2018), after Bowman et al. (2016) and Sønderby et
    al. (2016): ``β`` reaches 1 at the ``warmup``-th step or epoch.

    >>> [kl_warmup_weight(t, 4) for t in range(5)]
    [0.25, 0.5, 0.75, 1.0, 1.0]
    """
    return 1.0 if warmup <= 0 else min(1.0, (t + 1) / warmup)


class ScaleLatents(Messenger):
    r"""Multiply the log-densities of the *latent* (non-observed) sample sites by ``scale``.

    Applied to both model and guide it turns any ELBO into
    ``E_q[log p(x | z)] + β (E_q[log p(z)] - E_q[log q(z)])``, i.e. ``E_q[log p(x|z)] - β KL(q ‖ p)``:
    KL annealing. Observed sites, ``pyro.factor`` and ``pyro.deterministic`` (all observed) are
    left as they are. ``scale`` may be changed between calls.

    >>> import pyro, pyro.distributions as dist
    >>> def model():
    ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
    ...     pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))
    >>> trace = pyro.poutine.trace(ScaleLatents(0.25)(model)).get_trace()
    >>> trace.nodes["z"]["scale"], trace.nodes["x"]["scale"]
    (0.25, 1.0)
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def _pyro_sample(self, msg: Message) -> None:
        if not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = self.scale * msg["scale"]


# -- a loss that keeps to the device --------------------------------------------------------------


class SyncFreeTrace_ELBO(Trace_ELBO):
    r"""``Trace_ELBO`` for reparameterised guides whose loss stays a device tensor:
    ``-(log p(x, z) - log q(z))`` averaged over particles, with no ``.item()``.

    Pyro's ``Trace_ELBO`` converts every site's log-probability to a Python number, one
    host-device synchronisation per site on CUDA; this estimator sums them as tensors, so an SVI
    step only queues GPU work (turn Pyro's validation off as well, ``pyro.enable_validation(False)``:
    it checks every log-probability for NaN on the host). The gradient is the same as
    ``Trace_ELBO``'s when every guide site is reparameterised (all ``AutoContinuous`` guides,
    ``AutoNormal``, ``AutoFlowGuide``); a guide site that is not gets an error. (A guide with
    ``path_gradient=True`` inverts its layers every step, and iterative inverses (IAF, planar,
    Sylvester) test their convergence on the host: those steps synchronise.)
    """

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            for name, site in guide_trace.iter_stochastic_nodes():
                if not site["fn"].has_rsample:
                    raise ValueError(
                        f"SyncFreeTrace_ELBO: guide site {name!r} ({type(site['fn']).__name__}) is not "
                        f"reparameterised; use Trace_ELBO or TraceGraph_ELBO, whose score-function "
                        f"terms handle it"
                    )
            loss = loss + (guide_trace.log_prob_sum() - model_trace.log_prob_sum()) / self.num_particles
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if isinstance(loss, Tensor) and loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch.as_tensor(loss).detach()


# -- errors ---------------------------------------------------------------------------------------

_NONFINITE_HINT = (
    "Try a lower learning rate, gradient clipping (fit(clip_norm=10.0)), a smaller init_scale or "
    "fewer flow layers in the guide, or fit(on_nonfinite='retry') to lower the learning rate and go on."
)


class NonFiniteLossError(RuntimeError):
    """A step whose loss or gradients were NaN or infinite; it was not applied.

    ``step`` (counted from 1), ``params`` (names of parameters with non-finite gradients) and
    ``sites`` (``"model site 'x': ..."`` descriptions) say where.
    """

    def __init__(self, message: str, step: int, params: list[str], sites: list[str]) -> None:
        super().__init__(message)
        self.step, self.params, self.sites = step, params, sites

    def __reduce__(self) -> tuple:
        # pickled whole (e.g. raised in a worker process), not rebuilt from ``args`` alone
        return type(self), (self.args[0], self.step, self.params, self.sites)


class ModelStructureError(ValueError):
    """The model's sample sites changed between calls, or the guide does not match them."""


# -- the returned history -------------------------------------------------------------------------


@dataclass
class FitHistory:
    """What :func:`fit` did. ``loss[i]`` is step ``i + 1``'s loss (the annealed loss during KL
    warm-up); ``val_loss[j]`` the validation loss (full ELBO, β = 1) after step ``val_step[j]``;
    ``epoch_loss`` the mean training loss per epoch; ``lr_drops`` the steps at which
    ``on_nonfinite='retry'`` lowered the learning rate."""

    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    lr_drops: list[int] = field(default_factory=list)
    best_val_loss: float | None = None
    best_step: int | None = None
    stopped_early: bool = False

    @property
    def steps(self) -> int:
        """Steps taken (and recorded) so far."""
        return len(self.loss)

    def state(self) -> dict:
        """Plain lists and numbers, for a checkpoint."""
        return asdict(self)


# -- checks on what the model sees ----------------------------------------------------------------


class _SiteRecorder(Messenger):
    """Records each run's sample sites ``(name, observed)``. With ``check_data``, checks every
    observed site's data against its distribution (:func:`_check_observed`), scoring it once per
    site and dtype."""

    def __init__(self, check_data: bool) -> None:
        super().__init__()
        self.check_data = check_data
        self.runs: list[frozenset[tuple[str, bool]]] = []
        self._sites: list[tuple[str, bool]] = []
        self._scored: set[tuple[str, torch.dtype]] = set()

    def __enter__(self) -> _SiteRecorder:
        self._sites = []
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.runs.append(frozenset(self._sites))
        return super().__exit__(*exc)

    def _pyro_post_sample(self, msg: Message) -> None:
        infer = msg["infer"]
        if site_is_subsample(msg) or infer.get("is_auxiliary") or infer.get("enumerate"):
            return
        self._sites.append((msg["name"], msg["is_observed"]))
        if msg["is_observed"] and self.check_data and isinstance(msg["value"], Tensor):
            key = (msg["name"], msg["value"].dtype)
            _check_observed(msg, score=key not in self._scored)
            self._scored.add(key)


def _check_observed(msg: Message, score: bool) -> None:
    """The data of an observed site must not widen the distribution's shape by broadcasting, and
    (``score``) the distribution must be able to score it (dtype, support)."""
    name, fn, value = msg["name"], msg["fn"], msg["value"]
    fn_shape = fn.batch_shape + fn.event_shape
    try:
        shape = torch.broadcast_shapes(value.shape, fn_shape)
    except RuntimeError:
        shape = None
    if shape is None or math.prod(shape) > max(value.numel(), math.prod(fn_shape)):
        raise ValueError(
            f"observed site {name!r}: data of shape {tuple(value.shape)} does not fit the distribution "
            f"of shape {tuple(fn_shape)} ({type(fn).__name__}, batch {tuple(fn.batch_shape)}, event "
            f"{tuple(fn.event_shape)}): "
            + (
                "the shapes do not broadcast"
                if shape is None
                else f"broadcasting would score {tuple(shape)} pairs of values"
            )
            + ". Reshape the data (e.g. drop a trailing size-1 dimension) or the distribution's parameters."
        )
    if not score:
        return
    try:
        with torch.no_grad():
            fn.log_prob(value)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(
            f"observed site {name!r}: {type(fn).__name__} cannot score the data (shape "
            f"{tuple(value.shape)}, dtype {value.dtype}): {str(error).splitlines()[0]}. Check the data's "
            f"dtype (e.g. float data for Bernoulli and Normal, long for Categorical) and that it lies in "
            f"the distribution's support."
        ) from error


def _check_finite_data(args: Sequence, kwargs: Mapping, where: str) -> None:
    """NaN or infinity in a floating tensor argument: a ``ValueError`` naming it and the first index."""
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [
        (f"argument {k!r}", v) for k, v in kwargs.items()
    ]
    for label, value in named:
        if isinstance(value, Tensor) and value.is_floating_point():
            bad = ~torch.isfinite(value)
            if bad.any():
                index = tuple(torch.nonzero(bad)[0].tolist())
                raise ValueError(
                    f"fit: {label} of {where} holds {value[index].item()} at index {index} "
                    f"({int(bad.sum())} non-finite values in shape {tuple(value.shape)}). Remove or impute "
                    f"missing observations, or mask them in the model (pyro.sample(..., obs_mask=...))."
                )


def _split_batch(batch: object, where: str) -> tuple[tuple, dict]:
    """A batch as ``(args, kwargs)``: a tensor is one argument, a tuple/list several, a dict keywords."""
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, tuple | list):
        return tuple(batch), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    raise TypeError(
        f"fit: {where} is a {type(batch).__name__}; data must yield tensors, tuples or lists of "
        f"arguments, or dicts of keyword arguments (e.g. a torch DataLoader over a TensorDataset)"
    )


def _check_batches_source(data: object, name: str) -> None:
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            f"fit: {name} must be an iterable of batches (a list of argument tuples or a DataLoader), got "
            f"{type(data).__name__}; a single set of arguments is given as {name}=[(x, y)]"
        )


# -- learning rates -------------------------------------------------------------------------------


def _torch_optimizers(optim: PyroOptim) -> list[torch.optim.Optimizer]:
    return [getattr(obj, "optimizer", obj) for obj in optim.optim_objs.values()]


def _scale_learning_rate(optim: PyroOptim, factor: float) -> None:
    """Multiply every learning rate of ``optim`` (and its schedulers' base rates) by ``factor``."""
    for obj in optim.optim_objs.values():
        if hasattr(obj, "base_lrs"):
            obj.base_lrs = [lr * factor for lr in obj.base_lrs]
    for optimizer in _torch_optimizers(optim):
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
    args = optim.pt_optim_args  # for parameters the optimizer has not met yet
    if isinstance(args, dict) and "lr" in args:
        optim.pt_optim_args = {**args, "lr": args["lr"] * factor}


def _is_plateau(optim: PyroOptim) -> bool:
    constructor = getattr(optim, "pt_scheduler_constructor", None)
    return isinstance(constructor, type) and issubclass(constructor, ReduceLROnPlateau)


# -- fit ------------------------------------------------------------------------------------------


def _describe(value: object) -> str:
    """``module.Name`` of a class, or ``a Name`` for an instance."""
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    return f"a {type(value).__name__}"


def _positive_int(value: object, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"fit: {name} must be an integer >= {minimum}, got {value!r}")


def fit(
    model: Callable,
    guide: Callable,
    *args: Any,
    data: Iterable | None = None,
    epochs: int | None = None,
    num_steps: int | None = None,
    optim: PyroOptim | None = None,
    loss: ELBO | Callable | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    kl_warmup: int = 0,
    clip_norm: float | None = None,
    val_data: Iterable | None = None,
    val_every: int | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    callbacks: Sequence[Callable[[FitHistory], bool | None]] = (),
    on_nonfinite: str = "raise",
    max_retries: int = 5,
    lr_factor: float = 0.5,
    check_finite: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | os.PathLike | None = None,
    progress: bool | None = None,
    log_every: int = 10,
) -> FitHistory:
    r"""Train ``guide`` (and the model's parameters) by SVI; returns the :class:`FitHistory`.

    **What a step sees.** Without ``data``, every step calls ``model(*args, **model_kwargs)``
    for ``num_steps`` steps. With ``data`` (an iterable of batches, e.g. a ``DataLoader``; a
    batch is a tensor, a tuple of positional arguments or a dict of keyword arguments), each
    step takes the next batch and calls ``model(*batch, **model_kwargs)``, for ``epochs`` passes
    over ``data`` or ``num_steps`` steps; arguments that stay the same go in ``model_kwargs``.
    ``num_steps`` and ``epochs`` count from the start of the run, also when resuming.

    **The step.** ``loss`` (default ``Trace_ELBO()``; any Pyro ELBO or a callable
    ``loss(model, guide, *args, **kwargs)`` returning a differentiable tensor) computes the loss
    and gradients; with ``check_finite`` the step is checked, and a NaN or infinite loss or
    gradient raises :class:`NonFiniteLossError` naming the step, the parameters and the model and
    guide sites at fault, *without* applying the step: the parameters keep their last finite
    values. With ``on_nonfinite="retry"`` the step is instead drawn again with the learning rate
    multiplied by ``lr_factor``, up to ``max_retries`` times in a row. Then the gradients are
    clipped to total norm ``clip_norm`` (``torch.nn.utils.clip_grad_norm_``) and ``optim``
    (default ``pyro.optim.Adam({"lr": 1e-3})``) takes its step. A ``pyro.optim`` scheduler
    (e.g. ``pyro.optim.ExponentialLR``) is stepped after every epoch (every step without
    ``data``); ``ReduceLROnPlateau`` after every validation, with the validation loss.

    **KL warm-up.** With ``kl_warmup = N`` the latent sites' log-densities in model and guide are
    multiplied by ``β_t = min(1, (t + 1) / N)`` over the first ``N`` epochs (steps without
    ``epochs``), :class:`ScaleLatents`; the recorded training loss is the annealed one.

    **Validation and early stopping.** ``val_data`` (batches as for ``data``, also without
    ``data``: ``val_data=[(x_val, y_val)]``) is scored with
    ``loss`` at β = 1, without gradients, every ``val_every`` steps (default: every epoch with
    ``epochs``, every 100 steps otherwise). With ``patience`` the run stops after ``patience``
    validations in a row that do not improve on the best by more than ``min_delta`` (counted
    once the warm-up is over, as in the Sylvester-flows paper), and **the parameters of the best
    validation are restored at the end**.

    **Checks.** Data arguments with NaN or infinity are refused (with ``check_finite``), and so are
    observations a distribution cannot score or that would broadcast its shape up. The model's
    sample sites must be the same at every call and match the guide's, else
    :class:`ModelStructureError` (Pyro would only warn).

    **Checkpoints.** With ``checkpoint`` (a path), the param store, ``optim``'s state, the random
    generators, the step and this history are written every ``checkpoint_every`` steps, at the end,
    before a :class:`NonFiniteLossError`, and on ``KeyboardInterrupt`` (then re-raised); see
    :mod:`pyro_flowguides.checkpoint`. ``resume_from`` continues a run from such a file, giving on
    CPU the same losses, bit for bit, as the run that was not interrupted (for a ``data`` whose order
    comes from torch's global generator, as ``DataLoader(shuffle=True)`` without a ``generator``).

    **Progress and callbacks.** A tqdm bar shows the mean loss of the last ``log_every`` steps when
    ``progress`` is true (default: when stderr is a terminal). Each callback is called after every
    step with the history; one that returns ``True`` stops the run.

    **Devices.** ``fit`` adds no host-device synchronisation to a step except the finiteness check
    (one per step; ``check_finite=False`` removes it) and, when the bar or callbacks need the loss,
    one every ``log_every`` steps (every step with callbacks). Pyro's ``Trace_ELBO`` itself
    synchronises at every site; :class:`SyncFreeTrace_ELBO` does not.
    """
    trainer = _Trainer(
        model,
        guide,
        args,
        dict(model_kwargs or {}),
        data=data,
        epochs=epochs,
        num_steps=num_steps,
        optim=pyro.optim.Adam({"lr": 1e-3}) if optim is None else optim,
        loss=Trace_ELBO() if loss is None else loss,
        kl_warmup=kl_warmup,
        clip_norm=clip_norm,
        val_data=val_data,
        val_every=val_every,
        patience=patience,
        min_delta=min_delta,
        callbacks=list(callbacks),
        on_nonfinite=on_nonfinite,
        max_retries=max_retries,
        lr_factor=lr_factor,
        check_finite=check_finite,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        progress=sys.stderr.isatty() if progress is None else progress,
        log_every=log_every,
    )
    return trainer.run(resume_from)


@dataclass
class _Failure:
    """A step that was not finite: its loss, the parameters with non-finite gradients, the
    ``ValueError`` of a distribution that got invalid parameters or values, if that is what
    happened, and then the parameters whose values are not finite."""

    loss: Tensor | float
    params: list[str]
    invalid: ValueError | None
    nonfinite_values: list[str] = field(default_factory=list)


class _Trainer:
    """The state of one :func:`fit` run; the options are :func:`fit`'s."""

    def __init__(self, model: Callable, guide: Callable, args: tuple, kwargs: dict, **options: Any) -> None:
        self.__dict__.update(options)
        self.args, self.kwargs = args, kwargs
        self._validate_options(model, guide)
        self.model, self.guide = model, guide
        self.model_sites = _SiteRecorder(check_data=True)
        self.guide_sites = _SiteRecorder(check_data=False)
        self.model_scale, self.guide_scale = ScaleLatents(1.0), ScaleLatents(1.0)
        self.train_model = self.model_sites(self.model_scale(model))
        self.train_guide = self.guide_sites(self.guide_scale(guide))
        self.val_model, self.val_guide = self.model_sites(model), self.guide_sites(guide)
        self.history = FitHistory()
        self.step = 0  # steps done
        self.epoch = 0  # epochs done
        self.batch_in_epoch = 0  # batches of the current epoch done
        self.epoch_rng: Mapping | None = None  # generators at the start of the current epoch
        self.step_rng: Mapping | None = None  # generators at the start of the step under way
        self.reference_sites: frozenset[tuple[str, bool]] | None = None
        self.pending: list[Tensor | float] = []  # losses not yet in history.loss
        self.bad_validations = 0
        self.best_params: dict[str, Tensor] | None = None
        self.stop = False

    def _validate_options(self, model: Callable, guide: Callable) -> None:
        if not callable(model) or not callable(guide):
            raise TypeError(
                f"fit: model and guide must be callables, got {_describe(model)} and {_describe(guide)}"
            )
        if not isinstance(self.optim, PyroOptim):
            raise TypeError(
                f"fit: optim must be a Pyro optimizer such as pyro.optim.Adam({{'lr': 1e-3}}), got "
                f"{_describe(self.optim)}; Pyro's wrappers create a torch optimizer for each parameter "
                f"as the guide creates it"
            )
        if not (hasattr(self.loss, "loss_and_grads") or callable(self.loss)):
            raise TypeError(f"fit: loss must be a Pyro ELBO or a callable, got {_describe(self.loss)}")
        if self.data is None:
            if self.epochs is not None:
                raise ValueError("fit: epochs counts passes over data; give data=... or use num_steps")
            if self.num_steps is None:
                raise ValueError("fit: give num_steps (or data=... and epochs=...)")
        else:
            _check_batches_source(self.data, "data")
            if self.args:
                raise ValueError(
                    "fit: with data, each batch holds the model's positional arguments; pass the "
                    "arguments that stay the same through model_kwargs"
                )
            if (self.epochs is None) == (self.num_steps is None):
                raise ValueError("fit: with data, give exactly one of epochs and num_steps")
        for name in ("num_steps", "epochs", "patience", "val_every", "checkpoint_every"):
            if getattr(self, name) is not None:
                _positive_int(getattr(self, name), name)
        _positive_int(self.kl_warmup, "kl_warmup", minimum=0)
        _positive_int(self.max_retries, "max_retries", minimum=0)
        _positive_int(self.log_every, "log_every")
        clip = self.clip_norm
        if clip is not None and not (isinstance(clip, int | float) and 0 < clip < math.inf):
            raise ValueError(f"fit: clip_norm must be a finite number > 0, got {clip!r}")
        if not (isinstance(self.lr_factor, int | float) and 0 < self.lr_factor < 1):
            raise ValueError(f"fit: lr_factor must lie in (0, 1), got {self.lr_factor!r}")
        if self.on_nonfinite not in ("raise", "retry"):
            raise ValueError(f"fit: on_nonfinite must be 'raise' or 'retry', got {self.on_nonfinite!r}")
        if self.val_data is not None:
            _check_batches_source(self.val_data, "val_data")
        elif self.patience is not None or _is_plateau(self.optim):
            what = "patience (early stopping)" if self.patience is not None else "ReduceLROnPlateau"
            raise ValueError(f"fit: {what} needs a validation loss; give val_data=[(x_val, ...)]")
        if self.checkpoint_every is not None and self.checkpoint is None:
            raise ValueError("fit: checkpoint_every needs checkpoint=<path> to write to")
        if self.val_every is None and self.val_data is not None and self.epochs is None:
            self.val_every = 100

    # -- the run ----------------------------------------------------------------------------------
    def run(self, resume_from: str | os.PathLike | None) -> FitHistory:
        if self.check_finite:
            _check_finite_data(self.args, self.kwargs, "fit's arguments")
        if resume_from is not None:
            self._resume(resume_from)
        total = self.num_steps
        if total is None and hasattr(self.data, "__len__"):
            total = self.epochs * len(self.data)
        self.bar = tqdm(total=total, initial=self.step, disable=not self.progress, desc="fit", unit="step")
        try:
            if self.data is None:
                while self.step < self.num_steps and not self.stop:
                    self._train_step(self.args, self.kwargs)
            else:
                self._run_epochs()
            self._flush()
            if self.patience is not None and self.best_params is not None:
                _load_params(self.best_params)
            if self.checkpoint is not None:
                self._save()
        except KeyboardInterrupt:
            if self.checkpoint is not None:
                self._flush()
                self._save(rng=self.step_rng)  # the generators as they were before the lost step
            raise
        finally:
            self.bar.close()
        return self.history

    def _run_epochs(self) -> None:
        while not self.stop and (self.epochs is None or self.epoch < self.epochs):
            first_step = self.step - self.batch_in_epoch
            for batch in self._epoch_batches():
                where = f"batch {self.batch_in_epoch} of data (epoch {self.epoch})"
                args, kwargs = _split_batch(batch, where)
                kwargs = {**self.kwargs, **kwargs}
                if self.check_finite:
                    _check_finite_data(args, kwargs, where)
                self._train_step(args, kwargs, in_epoch=True)
                if self.stop or (self.num_steps is not None and self.step >= self.num_steps):
                    self.stop = True
                    break
            else:
                if self.step == first_step:
                    raise ValueError("fit: data yielded no batches")
                self._end_epoch(first_step)

    def _epoch_batches(self) -> Iterator:
        """``iter(data)``; when resuming inside an epoch, the same order as the first time (drawn
        with the generators as they were at the epoch's start) without the batches already done."""
        if self.batch_in_epoch == 0:
            self.epoch_rng = get_rng_state()
            return iter(self.data)
        resume_rng = get_rng_state()
        set_rng_state(self.epoch_rng)
        return self._skip_then_restore(islice(iter(self.data), self.batch_in_epoch, None), resume_rng)

    @staticmethod
    def _skip_then_restore(batches: Iterator, rng: Mapping) -> Iterator:
        first = next(batches, None)  # the loader draws its order here
        set_rng_state(rng)
        if first is not None:
            yield first
            yield from batches

    def _end_epoch(self, first_step: int) -> None:
        self._flush()
        epoch_losses = self.history.loss[first_step:]
        self.history.epoch_loss.append(sum(epoch_losses) / len(epoch_losses))
        self.epoch += 1
        self.batch_in_epoch = 0
        if self.epochs is not None:
            self._step_scheduler()
            if self.val_data is not None and self.val_every is None:
                self._validate()

    # -- one step ---------------------------------------------------------------------------------
    def _train_step(self, args: tuple, kwargs: dict, in_epoch: bool = False) -> None:
        beta = kl_warmup_weight(self.epoch if self.epochs is not None else self.step, self.kl_warmup)
        self.model_scale.scale = self.guide_scale.scale = beta
        self.step_rng = get_rng_state()
        for attempt in range(self.max_retries + 1):
            attempt_rng = self.step_rng if attempt == 0 else get_rng_state()
            outcome = self._attempt(args, kwargs)
            if not isinstance(outcome, _Failure):
                break
            if self.on_nonfinite == "raise" or attempt == self.max_retries:
                error = self._nonfinite_error(outcome, args, kwargs, attempt_rng, retries=attempt)
                if self.checkpoint is not None:
                    self._flush()
                    self._save()
                raise error
            _scale_learning_rate(self.optim, self.lr_factor)
            self.history.lr_drops.append(self.step + 1)
            warnings.warn(
                f"fit: step {self.step + 1} was not finite; the learning rate was multiplied by "
                f"{self.lr_factor} and the step drawn again",
                RuntimeWarning,
                stacklevel=5,
            )
        self.pending.append(outcome)
        self.step += 1
        self.batch_in_epoch += in_epoch
        self.step_rng = None
        self._after_step()

    def _attempt(self, args: tuple, kwargs: dict) -> Tensor | float | _Failure:
        """Loss and gradients, checked; the optimizer steps only when they are finite."""
        self.model_sites.runs.clear()
        self.guide_sites.runs.clear()
        invalid: ValueError | None = None
        nonfinite_values: list[str] = []
        with poutine.trace(param_only=True) as capture:
            try:
                loss = self._loss_and_grads(args, kwargs)
            except ValueError as error:  # torch's validation: of a distribution's parameters, or of a
                # value that a non-finite parameter put outside a site's support
                message = str(error)
                nonfinite_values = _params_holding_nonfinite(capture.trace)
                if not (
                    ("Expected parameter" in message and "found invalid values" in message)
                    or nonfinite_values
                ):
                    raise
                invalid, loss = error, math.nan
        params = {site["name"]: site["value"].unconstrained() for site in capture.trace.nodes.values()}
        try:
            self._check_structure()
            bad = self._nonfinite_params(loss, params) if self.check_finite or invalid else None
        except ModelStructureError:
            zero_grads(params.values())
            raise
        if invalid is not None or bad is not None:
            zero_grads(params.values())
            return _Failure(loss, bad or [], invalid, nonfinite_values)
        tensors = list(params.values())
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in tensors if p.grad is not None], self.clip_norm)
        self.optim(tensors)
        zero_grads(tensors)
        return loss

    def _loss_and_grads(self, args: tuple, kwargs: dict) -> Tensor | float:
        if hasattr(self.loss, "loss_and_grads"):
            return self.loss.loss_and_grads(self.train_model, self.train_guide, *args, **kwargs)
        loss = self.loss(self.train_model, self.train_guide, *args, **kwargs)
        loss.backward()
        return loss.detach()

    @staticmethod
    def _nonfinite_params(loss: Tensor | float, params: Mapping[str, Tensor]) -> list[str] | None:
        """``None`` when loss and gradients are finite, else the names of the parameters whose
        gradients are not. One host-device synchronisation.

        A gradient is finite when its sum is (NaN and ±inf propagate), and a sum costs a tenth of
        ``isfinite(grad).all()``; the only false alarm, a sum of finite terms overflowing, is ruled
        out by the exact check that names the parameters.
        """
        with_grad = [(name, p.grad) for name, p in params.items() if p.grad is not None]
        loss = torch.as_tensor(loss)
        device = with_grad[0][1].device if with_grad else loss.device
        sums = torch.stack([loss.to(device), *(grad.sum().to(device, loss.dtype) for _, grad in with_grad)])
        if bool(torch.isfinite(sums).all()):
            return None
        bad = [name for name, grad in with_grad if not torch.isfinite(grad).all()]
        return bad if bad or not torch.isfinite(loss) else None

    def _check_structure(self) -> None:
        """Every model run must have the first run's sites, and the guide's must match them."""
        runs = self.model_sites.runs
        if not runs:  # compiled (JIT) losses do not run the Python model again
            return
        if self.reference_sites is None:
            self.reference_sites = runs[0]
        for sites in runs:
            if sites != self.reference_sites:
                added = sorted(name for name, _ in sites - self.reference_sites)
                missing = sorted(name for name, _ in self.reference_sites - sites)
                raise ModelStructureError(
                    f"fit: the model's sample sites changed at step {self.step + 1}: new or changed "
                    f"{added}, gone {missing}, compared with the first call. An autoguide is built from "
                    f"the first call's sites; make the model's sites the same for every batch (sizes "
                    f"from plates, not Python branches on the data)."
                )
        latent = {name for name, observed in self.reference_sites if not observed}
        for sites in self.guide_sites.runs:
            guided = {name for name, _ in sites}
            if guided != latent:
                raise ModelStructureError(
                    f"fit: model and guide disagree at step {self.step + 1}: model latent sites without a "
                    f"guide site {sorted(latent - guided)}, guide sites not in the model "
                    f"{sorted(guided - latent)}. Build the guide from this model, and mark a guide's "
                    f"auxiliary sites with infer={{'is_auxiliary': True}}."
                )

    def _nonfinite_error(
        self, failure: _Failure, args: tuple, kwargs: dict, rng: Mapping, retries: int
    ) -> NonFiniteLossError:
        step = self.step + 1
        sites = self._nonfinite_sites(args, kwargs, rng)
        parts = []
        if failure.invalid is not None:
            lines = str(failure.invalid).splitlines()
            detail = next((line for line in lines if "Expected" in line), lines[0])
            what = "parameters" if "Expected parameter" in detail else "values"
            parts.append(f"a distribution got invalid {what} ({detail.strip()})")
        elif not math.isfinite(float(failure.loss)):
            parts.append(f"the loss is {float(failure.loss)}")
        if failure.nonfinite_values:
            parts.append(
                f"parameter(s) {', '.join(map(repr, failure.nonfinite_values))} hold NaN or infinity"
            )
        if failure.params:
            parts.append(f"non-finite gradients of parameter(s) {', '.join(map(repr, failure.params))}")
        parts += sites
        again = f" (also after {retries} retries with lower learning rates)" if retries else ""
        message = (
            f"fit: step {step} is not finite{again}: {'; '.join(parts)}. The step was not applied: the "
            f"parameters keep their values from step {step - 1}. {_NONFINITE_HINT}"
        )
        return NonFiniteLossError(message, step, failure.params, sites)

    def _nonfinite_sites(self, args: tuple, kwargs: dict, rng: Mapping) -> list[str]:
        """Replays the failed step's draw (the same generator state) and lists the sample sites
        whose value or log-density is not finite."""
        from .datasets import DatasetBatch, _datasets_at_once  # datasets imports this module

        after = get_rng_state()
        found = []
        try:
            runs: contextlib.AbstractContextManager = contextlib.nullcontext((self.model, self.guide))
            if len(args) == 1 and not kwargs and isinstance(args[0], DatasetBatch):
                batch = args[0]  # a loss over data sets: replay them all at once, as it ran them
                nesting = max_plate_nesting(self.model, self.guide, **batch[0])
                runs = _datasets_at_once(self.model, self.guide, batch, nesting)
                args, kwargs = (), batch.kwargs()
            set_rng_state(rng)
            with torch.no_grad(), poutine.block(), pyro.validation_enabled(False), runs as (model, guide):
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
                replayed = poutine.replay(model, trace=guide_trace)
                model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
                for role, trace in (("guide", guide_trace), ("model", model_trace)):
                    for name, site in trace.nodes.items():
                        if site["type"] != "sample" or site_is_subsample(site):
                            continue
                        if not torch.isfinite(torch.as_tensor(site["value"])).all():
                            found.append(f"{role} site {name!r} has a non-finite value")
                        elif not torch.isfinite(site["fn"].log_prob(site["value"])).all():
                            found.append(f"{role} site {name!r} has a non-finite log-density")
        except Exception as error:  # the diagnosis must not hide the error it explains
            found.append(f"the sites could not be replayed ({type(error).__name__}: {error})")
        finally:
            set_rng_state(after)
        return found

    # -- after a step -----------------------------------------------------------------------------
    def _after_step(self) -> None:
        self.bar.update(1)
        if self.epochs is None:
            self._step_scheduler()
        if self.val_every is not None and self.step % self.val_every == 0:
            self._validate()
        if self.progress and self.step % self.log_every == 0:
            self._flush()
            recent = self.history.loss[-self.log_every :]
            postfix = {"loss": f"{sum(recent) / len(recent):.5g}"}
            if self.history.val_loss:
                postfix["val"] = f"{self.history.val_loss[-1]:.5g}"
            self.bar.set_postfix(postfix, refresh=False)
        if self.callbacks:
            self._flush()
            if any([callback(self.history) is True for callback in self.callbacks]):
                self.stop = True
        if self.checkpoint_every is not None and self.step % self.checkpoint_every == 0:
            self._flush()
            self._save()

    def _step_scheduler(self) -> None:
        if isinstance(self.optim, PyroLRScheduler) and not _is_plateau(self.optim):
            self.optim.step()

    def _validate(self) -> None:
        losses = []
        with torch.no_grad():
            for index, batch in enumerate(self.val_data):
                args, kwargs = _split_batch(batch, f"batch {index} of val_data")
                kwargs = {**self.kwargs, **kwargs}
                if self.check_finite:
                    _check_finite_data(args, kwargs, f"batch {index} of val_data")
                self.model_sites.runs.clear()
                self.guide_sites.runs.clear()
                if hasattr(self.loss, "loss"):
                    losses.append(float(self.loss.loss(self.val_model, self.val_guide, *args, **kwargs)))
                else:
                    losses.append(float(self.loss(self.val_model, self.val_guide, *args, **kwargs)))
                self._check_structure()
        value = sum(losses) / len(losses)
        self.history.val_loss.append(value)
        self.history.val_step.append(self.step)
        if _is_plateau(self.optim):
            self.optim.step(value)
        if self.model_scale.scale < 1.0:  # early stopping starts once the warm-up is over
            return
        best = self.history.best_val_loss
        if best is None or value < best - self.min_delta:
            self.history.best_val_loss, self.history.best_step = value, self.step
            self.bad_validations = 0
            if self.patience is not None:
                self.best_params = _param_values()
        else:
            self.bad_validations += 1
            if self.patience is not None and self.bad_validations >= self.patience:
                self.history.stopped_early = True
                self.stop = True

    def _flush(self) -> None:
        """Move the recorded losses into the history: one synchronisation when they live on a GPU."""
        if self.pending and all(isinstance(x, Tensor) for x in self.pending):
            self.history.loss.extend(torch.stack(self.pending).double().tolist())
        else:
            self.history.loss.extend(float(x) for x in self.pending)
        self.pending.clear()

    # -- checkpoints ------------------------------------------------------------------------------
    def _save(self, rng: Mapping | None = None) -> None:
        extra = {
            "history": self.history.state(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_rng": None if self.epoch_rng is None else portable_rng_state(self.epoch_rng),
            "bad_validations": self.bad_validations,
            "best_params": self.best_params,
            "model_sites": None if self.reference_sites is None else sorted(self.reference_sites),
        }
        save_checkpoint(self.checkpoint, self.optim, step=self.step, extra=extra, rng=rng)

    def _resume(self, path: str | os.PathLike) -> None:
        saved = read_checkpoint(path)
        # one run of guide and model on the first batch creates the parameters to load into
        args, kwargs = self.args, self.kwargs
        if self.data is not None:
            args, batch_kwargs = _split_batch(next(iter(self.data), None), "batch 0 of data")
            kwargs = {**kwargs, **batch_kwargs}
        self.model_sites.runs.clear()
        with poutine.block():
            guide_trace = poutine.trace(self.train_guide).get_trace(*args, **kwargs)
            poutine.replay(self.train_model, trace=guide_trace)(*args, **kwargs)
        extra = saved.extra
        saved_sites = frozenset((name, observed) for name, observed in extra["model_sites"] or ())
        if extra["model_sites"] is not None and saved_sites != self.model_sites.runs[-1]:
            raise CheckpointMismatchError(
                f"{path} was saved from a model with sample sites {sorted(n for n, _ in saved_sites)}, "
                f"but this model has {sorted(n for n, _ in self.model_sites.runs[-1])}; resume with the "
                f"model the checkpoint was saved from"
            )
        saved.restore(self.optim)
        self.step = saved.step
        self.history = FitHistory(**extra["history"])
        self.epoch, self.batch_in_epoch = extra["epoch"], extra["batch_in_epoch"]
        self.epoch_rng = extra["epoch_rng"]
        self.bad_validations = extra["bad_validations"]
        self.best_params = extra["best_params"]
        self.reference_sites = saved_sites if extra["model_sites"] is not None else None


def _params_holding_nonfinite(trace: poutine.Trace) -> list[str]:
    """The parameter sites recorded in ``trace`` that hold a NaN or infinity."""
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "param" and not torch.isfinite(site["value"].unconstrained()).all()
    ]


def _param_values() -> dict[str, Tensor]:
    """Copies of the param store's unconstrained values."""
    return {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}


def _load_params(values: Mapping[str, Tensor]) -> None:
    live = dict(pyro.get_param_store().named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            live[name].copy_(value)
