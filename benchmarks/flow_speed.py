"""Speed of one flow layer: forward + log-determinant + backward, ours against Pyro's (and zuko's).

For every layer in ``pyro_flowguides.flows`` and every dimension D (default 2, 10, 100, 1000), one
timed step is, on a fresh batch ``x = torch.randn(batch, D)`` (batch 256; drawn outside the timer)::

    y = layer(x); ld = layer.log_abs_det_jacobian(x, y); (y.sum() + ld.sum()).backward(); zero grads

Each layer is compared with its counterpart built in the same run:

* planar / radial            -> ``pyro.distributions.transforms.Planar(D)`` / ``Radial(D)``
* householder_sylvester      -> Pyro ``Sylvester(D, count_transforms=K)``, K = our number of reflections
* householder                -> Pyro ``Householder(D, count_transforms=K)``, the same K
* iaf                        -> Pyro ``affine_autoregressive(D)`` (hidden ``[3D + 1]``), Pyro
  ``AffineAutoregressive`` on a MADE with our hidden widths, zuko ``MaskedAutoregressiveTransform``
* affine_coupling            -> Pyro ``affine_coupling(D)`` (hidden ``[10D]``), the same with our
  hidden widths, zuko ``MaskedAutoregressiveTransform(passes=2)``
* neural_spline              -> Pyro ``spline_coupling(D)`` (hidden ``[10D, 10D]``), the same with our
  hidden widths, zuko ``MaskedAutoregressiveTransform(passes=2)`` with ``MonotonicRQSTransform``

Every zuko layer is timed twice: with zuko's default hidden widths ``[64, 64]`` and with ours (the
widths are in the counterpart's name), so that network size and implementation can be told apart.

orthogonal/triangular Sylvester, generalized planar, lu_linear and additive coupling have no counterpart
and are timed alone. zuko is optional: its rows are skipped when it is not installed. A counterpart
whose network would have more than ``--max-weights`` weights (Pyro's default spline coupling at
D = 1000: about 2.6e8) is skipped and the reason is written in its row.

Protocol: one thread (``torch.set_num_threads(1)``); every parameter redrawn as ``N(0, 0.1²)`` so that
no identity shortcut at initialisation flatters anyone; per (D, layer) every contender is built once,
warmed up (up to ``--warmup`` steps) and then timed step by step in interleaved blocks: each round
runs about ``--block`` consecutive steps of every contender (the order rotated each round), so that
load from other processes hits all of them alike while each is timed as it runs in use, warm
(timed one step each, alternating, a layer pays for the cache misses its neighbour causes: the
ratio then depended on which other contenders were in the group, by up to 10% at D = 2). Each
contender gets up to ``--repeats`` steps, fewer when slow (about ``--budget`` seconds each, at least 3).
The median is reported, and the ratio ours / counterpart, which is robust to the machine's load.

D-scaling: for the Sylvester layers, generalized planar (and planar as a reference) the layer at
D = 100 and at D = 1000 is timed interleaved in the same way, and time(1000) / time(100) is reported
(target <= 12 at a fixed bottleneck M; householder/triangular Sylvester have M = D by construction).

Run from the repository root (about 2 minutes; allow up to 10 on a loaded 2-core machine)::

    python benchmarks/flow_speed.py
    python benchmarks/flow_speed.py --dims 10 100 --repeats 10 --out /tmp/flow_speed

Writes ``flow_speed.json`` (a list of rows) and ``flow_speed.md`` (markdown tables) under ``--out``
(default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import pyro
import pyro.distributions.transforms as pyro_t
import torch
from pyro.nn import AutoRegressiveNN
from torch import Tensor, nn

from pyro_flowguides import flows

try:  # zuko is not a dependency of the library: its rows are skipped without it
    import zuko
    from zuko.flows.autoregressive import MaskedAutoregressiveTransform
    from zuko.transforms import MonotonicRQSTransform
except ImportError:  # pragma: no cover - depends on the environment
    zuko = None

MIN_REPEATS = 3
MIN_ROUNDS = 10  # interleaved rounds at least (when there are that many steps)
SCALING_LAYERS: list[tuple[str, dict[str, object], str]] = [
    ("orthogonal_sylvester", {}, "fixed M = 32 (default min(D, 32))"),
    ("orthogonal_sylvester", {"num_ortho_vecs": 8}, "fixed M = 8"),
    ("generalized_planar", {}, "fixed M = 8 (default min(D, 8))"),
    ("householder_sylvester", {}, "M = D (K = 8 reflections)"),
    ("triangular_sylvester", {}, "M = D"),
    ("planar", {}, "reference, O(D)"),
]
FIXED_M_TARGET = 12.0


class Skip(Exception):
    """A contender deliberately not run (reason in the message)."""


# -- contenders ----------------------------------------------------------------------------------
@dataclass
class Contender:
    """One layer under test: ``step(x)`` returns the scalar ``y.sum() + log_det.sum()``."""

    name: str
    module: nn.Module
    step: Callable[[Tensor], Tensor]
    times: list[float] = field(default_factory=list)
    count: int = 0
    error: str | None = None
    note: str | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def once(self, batch: int, dim: int) -> float:
        x = torch.randn(batch, dim)
        params = self.params
        start = time.perf_counter()
        loss = self.step(x)
        loss.backward()
        for p in params:
            p.grad = None
        elapsed = time.perf_counter() - start
        if self.note is None and not bool(torch.isfinite(loss)):
            self.note = "non-finite loss"
        return elapsed

    def median_ms(self) -> float | None:
        return 1e3 * statistics.median(self.times) if self.times else None

    def quartiles_ms(self) -> tuple[float, float] | None:
        if len(self.times) < 2:
            return None
        q = statistics.quantiles(self.times, n=4, method="inclusive")
        return 1e3 * q[0], 1e3 * q[2]


def randomise(module: nn.Module) -> nn.Module:
    """Move every parameter away from its initial value: ``N(0, 0.1²)``."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1)
    return module


def transform_step(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """Step of a Pyro-style TransformModule (ours and Pyro's)."""

    def step(x: Tensor) -> Tensor:
        y = module(x)
        ld = module.log_abs_det_jacobian(x, y)
        return y.sum() + ld.sum()

    return step


def zuko_step(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """Step of a zuko lazy transform: ``t = module()``, ``(y, ladj) = t.call_and_ladj(x)``."""

    def step(x: Tensor) -> Tensor:
        y, ld = module().call_and_ladj(x)
        return y.sum() + ld.sum()

    return step


def mlp_weights(widths: Sequence[int]) -> int:
    """Weights and biases of a dense MLP with the given layer widths."""
    return sum(a * b + b for a, b in pairwise(widths))


def ours(name: str, dim: int, **options: object) -> Contender:
    label = "ours" if not options else "ours[" + ", ".join(f"{k}={v}" for k, v in options.items()) + "]"
    module = randomise(flows.make(name, dim, **options))
    return Contender(label, module, transform_step(module))


def hidden_dims_of(layer: nn.Module) -> list[int]:
    """The hidden widths our network layer was built with (read back, not assumed)."""
    return list(layer.layer.options["hidden_dims"])


def num_vectors(layer: nn.Module) -> int:
    """Number of reflection vectors of our Householder / Householder-Sylvester layer."""
    return int(layer.v.shape[0])


def counterparts(name: str, dim: int, layer: nn.Module, max_weights: int) -> list[Callable[[], Contender]]:
    """Builders of the counterparts of our layer ``name`` (built lazily; may raise :class:`Skip`)."""

    def pyro_module(label: str, build: Callable[[], nn.Module]) -> Callable[[], Contender]:
        def make() -> Contender:
            with warnings.catch_warnings():  # e.g. "count_transforms > input_dim" at D = 2
                warnings.simplefilter("ignore", UserWarning)
                module = randomise(build())
            return Contender(label, module, transform_step(module))

        return make

    def zuko_module(label: str, build: Callable[[], nn.Module]) -> Callable[[], Contender]:
        def make() -> Contender:
            if zuko is None:
                raise Skip("zuko not installed")
            module = randomise(build())
            return Contender(label, module, zuko_step(module))

        return make

    def too_big(label: str, weights: int) -> Callable[[], Contender]:
        def make() -> Contender:
            raise Skip(f"{label}: network of {weights:.2g} weights > --max-weights {max_weights:.2g}")

        return make

    def coupling_contenders(
        pyro_name, pyro_factory, hidden, default, params_per_coordinate, zuko_label, zuko_options
    ):
        """Pyro's coupling layer at its default widths (unless too big) and at ours; zuko's at [64, 64]
        and at ours."""
        split = dim // 2
        weights = mlp_weights([split, *default, (dim - split) * params_per_coordinate])
        label = f"pyro {pyro_name} {default}"
        rows = [
            too_big(label, weights)
            if weights > max_weights
            else pyro_module(label, lambda: pyro_factory(dim))
        ]
        rows.append(pyro_module(f"pyro {pyro_name} {hidden}", lambda: pyro_factory(dim, hidden_dims=hidden)))
        for widths in ([64, 64], hidden):
            rows.append(
                zuko_module(
                    f"{zuko_label} {widths}",
                    lambda widths=widths: MaskedAutoregressiveTransform(
                        features=dim, context=0, passes=2, hidden_features=widths, **zuko_options
                    ),
                )
            )
        return rows

    out: list[Callable[[], Contender]] = []
    if name == "planar":
        out.append(pyro_module("pyro Planar", lambda: pyro_t.Planar(dim)))
    elif name == "radial":
        out.append(pyro_module("pyro Radial", lambda: pyro_t.Radial(dim)))
    elif name == "householder_sylvester":
        k = num_vectors(layer)
        out.append(pyro_module(f"pyro Sylvester(K={k})", lambda: pyro_t.Sylvester(dim, count_transforms=k)))
    elif name == "householder":
        k = num_vectors(layer)
        out.append(
            pyro_module(f"pyro Householder(K={k})", lambda: pyro_t.Householder(dim, count_transforms=k))
        )
    elif name == "iaf":
        hidden = hidden_dims_of(layer)
        out.append(
            pyro_module(
                f"pyro affine_autoregressive [{3 * dim + 1}]", lambda: pyro_t.affine_autoregressive(dim)
            )
        )
        out.append(
            pyro_module(
                f"pyro AffineAutoregressive {hidden}",
                lambda: pyro_t.AffineAutoregressive(AutoRegressiveNN(dim, hidden)),
            )
        )
        for widths in ([64, 64], hidden):
            out.append(
                zuko_module(
                    f"zuko MAT(passes=None) {widths}",
                    lambda widths=widths: MaskedAutoregressiveTransform(
                        features=dim, context=0, passes=None, hidden_features=widths
                    ),
                )
            )
    elif name == "affine_coupling":
        out += coupling_contenders(
            "affine_coupling",
            pyro_t.affine_coupling,
            hidden_dims_of(layer),
            [10 * dim],
            2,
            "zuko MAT(passes=2)",
            {},
        )
    elif name == "neural_spline":
        bins = 8
        out += coupling_contenders(
            "spline_coupling",
            pyro_t.spline_coupling,
            hidden_dims_of(layer),
            [10 * dim, 10 * dim],
            4 * bins - 1,
            f"zuko MAT(passes=2, RQS {bins} bins)",
            {"univariate": MonotonicRQSTransform, "shapes": [(bins,), (bins,), (bins - 1,)]},
        )
    return out


# -- timing --------------------------------------------------------------------------------------
def measure(
    group: list[tuple[Contender, int]], batch: int, repeats: int, budget: float, warmup: int, block: int
) -> None:
    """Warm up, then time every ``(contender, dim)`` of ``group`` in interleaved blocks, round by round.

    Each contender gets ``count`` steps, ``min(repeats, budget / its step time)`` but at least
    ``MIN_REPEATS``, spread evenly over the rounds (about ``block`` steps per round for the one with
    the most, fewer when that would make less than ``MIN_ROUNDS`` rounds) so that all of them span
    the same stretch of time.
    """
    live: list[tuple[Contender, int]] = []
    for c, dim in group:
        try:
            spent, warm = 0.0, []
            for _ in range(max(1, warmup)):
                warm.append(c.once(batch, dim))
                spent += warm[-1]
                if spent > budget / 2:
                    break
            estimate = statistics.median(warm[1:] or warm)
            c.count = min(repeats, max(MIN_REPEATS, int(budget / max(estimate, 1e-9))))
            live.append((c, dim))
        except Exception as exc:  # a failing layer is reported, not fatal
            c.error = f"{type(exc).__name__}: {exc}"
    if not live:
        return
    most = max(c.count for c, _ in live)
    rounds = min(most, max(MIN_ROUNDS, most // max(1, block)))  # slow layers: shorter blocks
    for r in range(rounds):
        shift = r % len(live)
        for c, dim in live[shift:] + live[:shift]:
            if c.error is not None:
                continue
            due = (r + 1) * c.count // rounds - r * c.count // rounds
            try:
                for _ in range(due):
                    c.times.append(c.once(batch, dim))
            except Exception as exc:
                c.error = f"{type(exc).__name__}: {exc}"


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# -- the benchmark -------------------------------------------------------------------------------
def compare_rows(args: argparse.Namespace) -> list[dict]:
    """Ours against counterparts, per (D, layer)."""
    rows: list[dict] = []
    names = args.layers or flows.available()
    variants: list[tuple[str, dict[str, object]]] = [(n, {}) for n in names]
    if "orthogonal_sylvester" in names:
        variants.append(("orthogonal_sylvester", {"num_ortho_vecs": 8}))
    for dim in args.dims:
        for name, options in variants:
            if options and dim < max(int(v) for v in options.values()):
                continue  # a fixed-M variant needs M <= D
            started = time.perf_counter()
            try:
                mine = ours(name, dim, **options)
            except Exception as exc:
                rows.append(
                    {
                        "kind": "compare",
                        "layer": name,
                        "options": options,
                        "dim": dim,
                        "ours_ms": None,
                        "counterpart": None,
                        "counterpart_ms": None,
                        "ratio": None,
                        "note": f"ours not built: {type(exc).__name__}: {exc}",
                    }
                )
                print(f"  D={dim:<5} {name}: not built ({exc})", flush=True)
                continue
            others: list[Contender] = []
            skipped: list[tuple[str, str]] = []
            builders = [] if options else counterparts(name, dim, mine.module, args.max_weights)
            for build in builders:
                try:
                    others.append(build())
                except Skip as exc:
                    skipped.append((str(exc).split(":")[0], str(exc)))
                except Exception as exc:
                    skipped.append(("counterpart", f"not built: {type(exc).__name__}: {exc}"))
            measure(
                [(c, dim) for c in [mine, *others]],
                args.batch,
                args.repeats,
                args.budget,
                args.warmup,
                args.block,
            )
            base = {
                "kind": "compare",
                "layer": name,
                "options": options,
                "dim": dim,
                "batch": args.batch,
                "ours_ms": mine.median_ms(),
                "ours_iqr_ms": mine.quartiles_ms(),
                "ours_n": len(mine.times),
            }
            notes = [n for n in (mine.error, mine.note) if n]
            if not others and not skipped:
                rows.append(
                    {
                        **base,
                        "counterpart": None,
                        "counterpart_ms": None,
                        "ratio": None,
                        "note": "; ".join(notes) or None,
                    }
                )
            for c in others:
                cp_notes = notes + [n for n in (c.error, c.note) if n]
                rows.append(
                    {
                        **base,
                        "counterpart": c.name,
                        "counterpart_ms": c.median_ms(),
                        "counterpart_iqr_ms": c.quartiles_ms(),
                        "counterpart_n": len(c.times),
                        "ratio": ratio(mine.median_ms(), c.median_ms()),
                        "note": "; ".join(cp_notes) or None,
                    }
                )
            for label, why in skipped:
                rows.append(
                    {
                        **base,
                        "counterpart": label,
                        "counterpart_ms": None,
                        "ratio": None,
                        "note": "skipped: " + why,
                    }
                )
            shown = ", ".join(f"{c.name} {fmt_ms(c.median_ms())}" for c in others)
            print(
                f"  D={dim:<5} {label_of(name, options):<32} ours {fmt_ms(mine.median_ms()):>7} ms"
                f"{'  vs ' + shown if shown else ''}  ({time.perf_counter() - started:.1f} s)",
                flush=True,
            )
            del mine, others
    return rows


def label_of(name: str, options: dict[str, object]) -> str:
    if not options:
        return name
    return name + "[" + ", ".join(f"{k}={v}" for k, v in options.items()) + "]"


def scaling_rows(args: argparse.Namespace) -> list[dict]:
    """time(D_hi) / time(D_lo) for the Sylvester family and generalized planar, timed interleaved."""
    lo, hi = args.scaling_dims
    rows: list[dict] = []
    for name, options, what in SCALING_LAYERS:
        if args.layers and name not in args.layers:
            continue
        try:
            small, large = ours(name, lo, **options), ours(name, hi, **options)
        except Exception as exc:
            rows.append(
                {
                    "kind": "scaling",
                    "layer": name,
                    "options": options,
                    "what": what,
                    "note": f"not built: {type(exc).__name__}: {exc}",
                }
            )
            continue
        measure([(small, lo), (large, hi)], args.batch, args.repeats, args.budget, args.warmup, args.block)
        r = ratio(large.median_ms(), small.median_ms())
        fixed_m = what.startswith("fixed")
        verdict = None if not fixed_m or r is None else ("ok" if r <= FIXED_M_TARGET else "above target")
        rows.append(
            {
                "kind": "scaling",
                "layer": name,
                "options": options,
                "what": what,
                "batch": args.batch,
                "dim_lo": lo,
                "dim_hi": hi,
                "ms_lo": small.median_ms(),
                "ms_hi": large.median_ms(),
                "ratio": r,
                "target": FIXED_M_TARGET if fixed_m else None,
                "verdict": verdict,
                "note": "; ".join(n for n in (small.error, large.error) if n) or None,
            }
        )
        print(
            f"  {label_of(name, options):<36} D={lo}: {fmt_ms(small.median_ms())} ms, D={hi}: "
            f"{fmt_ms(large.median_ms())} ms, ratio {fmt_ratio(r)}  [{what}]",
            flush=True,
        )
    return rows


def table_scaling(rows: list[dict], lo: int, hi: int) -> dict[str, float]:
    """The same ratio from the comparison table (separate measurements; noisier)."""
    ms = {
        (label_of(r["layer"], r["options"]), r["dim"]): r["ours_ms"] for r in rows if r["kind"] == "compare"
    }
    out = {}
    for (label, dim), value in ms.items():
        if dim == hi and (label, lo) in ms and value is not None and ms[(label, lo)]:
            out[label] = value / ms[(label, lo)]
    return out


# -- output --------------------------------------------------------------------------------------
def compare_table(rows: list[dict]) -> list[list[str]]:
    table = [["layer", "D", "ours ms", "counterpart", "counterpart ms", "ratio ours/cp", "note"]]
    for r in rows:
        if r["kind"] != "compare":
            continue
        table.append(
            [
                label_of(r["layer"], r["options"]),
                str(r["dim"]),
                fmt_ms(r["ours_ms"]),
                r["counterpart"] or "-",
                fmt_ms(r["counterpart_ms"]),
                fmt_ratio(r["ratio"]),
                r.get("note") or "",
            ]
        )
    return table


def scaling_table(rows: list[dict], from_table: dict[str, float]) -> list[list[str]]:
    table = [
        [
            "layer",
            "bottleneck M",
            "ms D=lo",
            "ms D=hi",
            "ratio hi/lo (interleaved)",
            "ratio (from table)",
            "verdict",
        ]
    ]
    for r in rows:
        if r["kind"] != "scaling":
            continue
        label = label_of(r["layer"], r["options"])
        table.append(
            [
                label,
                r["what"],
                fmt_ms(r.get("ms_lo")),
                fmt_ms(r.get("ms_hi")),
                fmt_ratio(r.get("ratio")),
                fmt_ratio(from_table.get(label)),
                r.get("verdict") or "-",
            ]
        )
    return table


def render_text(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_md(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table[1:]]
    return "\n".join(lines)


def slower_summary(rows: list[dict], threshold: float) -> list[str]:
    out = []
    for r in rows:
        if r["kind"] == "compare" and r["ratio"] is not None and r["ratio"] > threshold:
            out.append(
                f"{label_of(r['layer'], r['options'])} at D={r['dim']}: {r['ratio']:.2f}x "
                f"{r['counterpart']} ({fmt_ms(r['ours_ms'])} vs {fmt_ms(r['counterpart_ms'])} ms)"
            )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 10, 100, 1000], help="dimensions D")
    parser.add_argument("--repeats", type=int, default=50, help="timed steps per contender (fewer when slow)")
    parser.add_argument("--batch", type=int, default=256, help="batch size")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--budget", type=float, default=2.0, help="about this many seconds per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps (fewer when slow)")
    parser.add_argument("--block", type=int, default=10, help="consecutive steps per contender per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--layers", nargs="+", default=None, help="only these layer names")
    parser.add_argument("--scaling-dims", type=int, nargs=2, default=[100, 1000], metavar=("LO", "HI"))
    parser.add_argument("--no-scaling", action="store_true", help="skip the D-scaling section")
    parser.add_argument(
        "--max-weights", type=float, default=5e7, help="skip counterparts whose network is larger than this"
    )
    parser.add_argument(
        "--slower-threshold", type=float, default=1.10, help="ratio above which our layer is listed as slower"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    started = time.perf_counter()
    print(
        f"flow_speed: batch {args.batch}, dims {args.dims}, threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, pyro {pyro.__version__}, "
        f"zuko {getattr(zuko, '__version__', 'not installed')}",
        flush=True,
    )

    rows = compare_rows(args)
    if not args.no_scaling:
        print("D-scaling (interleaved):", flush=True)
        rows += scaling_rows(args)
    lo, hi = args.scaling_dims
    from_table = table_scaling(rows, lo, hi)
    elapsed = time.perf_counter() - started

    compare = compare_table(rows)
    scaling = scaling_table(rows, from_table)
    slower = slower_summary(rows, args.slower_threshold)
    print("\n" + render_text(compare))
    if len(scaling) > 1:
        print(
            f"\nD-scaling, time(D={hi}) / time(D={lo}); target <= {FIXED_M_TARGET:g} at fixed M\n"
            + render_text(scaling).replace("D=lo", f"D={lo}").replace("D=hi", f"D={hi}")
        )
    print(f"\nours slower than a counterpart (ratio > {args.slower_threshold}):")
    print("\n".join("  " + s for s in slower) or "  none")
    print(f"\ntotal {elapsed:.0f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flow_speed.json").write_text(json.dumps(rows, indent=1) + "\n")
    header = (
        f"# Flow layer speed: forward + log-det + backward\n\n"
        f"Batch {args.batch}, {torch.get_num_threads()} thread(s), median ms per step; ratio = ours / "
        f"counterpart, timed interleaved in the same run (robust to load). torch {torch.__version__}, "
        f"pyro {pyro.__version__}, zuko {getattr(zuko, '__version__', 'not installed')}, "
        f"{platform.machine()}, {elapsed:.0f} s in all.\n\n"
        f"    python benchmarks/flow_speed.py --dims {' '.join(map(str, args.dims))} "
        f"--repeats {args.repeats} --batch {args.batch}\n\n"
    )
    md = header + render_md(compare) + "\n"
    if len(scaling) > 1:
        md += (
            f"\n## D-scaling: time(D={hi}) / time(D={lo})\n\nTarget <= {FIXED_M_TARGET:g} at a fixed "
            f'bottleneck M; householder/triangular Sylvester have M = D. "interleaved": both sizes '
            f'timed in one interleaved run; "from table": the two rows above.\n\n'
            + render_md(scaling).replace("D=lo", f"D={lo}").replace("D=hi", f"D={hi}")
            + "\n"
        )
    md += f"\n## Ours slower than a counterpart (ratio > {args.slower_threshold})\n\n"
    md += "\n".join("- " + s for s in slower) + "\n" if slower else "none\n"
    (args.out / "flow_speed.md").write_text(md)
    print(f"wrote {args.out / 'flow_speed.json'} and {args.out / 'flow_speed.md'}")


if __name__ == "__main__":
    main()
