"""FLOPs of a traced step: every matmul it runs, recompute and loops included.

XLA's own count (`cost_analysis`) is no use for a training step: it counts a while loop's
body once (a scan over 80 layers reads as one layer), and the GPU compiler gives none. So
this walks the step's jaxpr instead, after autodiff and remat: `dot_general` and
`ragged_dot` (2 FLOPs a multiply-add), scans times their length, `shard_map` bodies (per
device) times the devices they run on, a `cond` as its costliest branch. A Pallas kernel is
counted by the cost estimate it declares, if any (`uncounted` counts those without one).
"""

from __future__ import annotations

import dataclasses
import math

from jax.extend import core as jex_core


@dataclasses.dataclass
class Flops:
    flops: float = 0.0
    uncounted: int = 0  # kernel calls with no cost estimate

    def __iadd__(self, other: Flops) -> Flops:
        self.flops += other.flops
        self.uncounted += other.uncounted
        return self

    def scaled(self, factor: float) -> Flops:
        return Flops(self.flops * factor, self.uncounted)


def _dot_flops(eqn) -> float:
    lhs = eqn.invars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    out = eqn.outvars[0].aval
    return 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def _ragged_dot_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars[:2])  # [M, K] @ [E, K, N]: each row meets one group
    return 2.0 * lhs.shape[0] * lhs.shape[1] * rhs.shape[-1]


def _sub_jaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> Flops:
    total = Flops()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += Flops(_dot_flops(eqn))
        elif name.startswith("ragged_dot"):
            total += Flops(_ragged_dot_flops(eqn))
        elif name == "pallas_call":
            estimate = eqn.params.get("cost_estimate")
            total += Flops(float(estimate.flops)) if estimate is not None else Flops(0.0, 1)
        elif name == "cond":
            branches = [jaxpr_flops(b.jaxpr) for b in eqn.params["branches"]]
            total += max(branches, key=lambda f: f.flops)
        else:
            inner = Flops()
            for key, value in eqn.params.items():
                if key in ("cond_jaxpr",):
                    continue
                for sub in _sub_jaxprs(value):
                    inner += jaxpr_flops(sub)
            if name == "scan":
                inner = inner.scaled(eqn.params["length"])
            elif name == "shard_map":
                mesh = eqn.params["mesh"]
                axes = eqn.params.get("manual_axes", mesh.axis_names)
                inner = inner.scaled(math.prod(mesh.shape[a] for a in axes))
            total += inner
    return total
