"""When a Dreamer V1 actor enters and leaves its constant-action phase, read from a run's ``metrics.csv``.

Early in training the V1 actor's imagined actions run to the tanh bound (the authors' agent too: every seed scores
the return of a constant action at the first evaluation). ``actor/saturated_fraction`` (the fraction of imagined
action components with ``|a| > 0.99``, :mod:`losses.behaviour`) shows it. A logged row is *in the phase* when that
fraction is at least ``threshold`` (0.9 by default: nine actions in ten at the bound). The run

- *entered* the phase at the first such row;
- *left* it at the first row after the last such row (a run that falls back into the phase leaves it only when it
  leaves it for good; ``relapses`` counts the falls back); a run whose last row is in the phase has not left it;

and the diagnostics "at the exit" are the means over the rows from the exit on that were logged at its frame count
(that collection phase's log rows). DreamerV3 runs do not log the column: nothing is reported for them.
"""

from __future__ import annotations

import dataclasses

import pandas as pd

SATURATED_COLUMN = "actor/saturated_fraction"
# What the exit is described by: saturation, the actor's gradient (it vanishes in the phase) and the prior's KL.
EXIT_DIAGNOSTICS = (
    SATURATED_COLUMN,
    "actor/mean_abs",
    "actor/std_median",
    "grad_norm/actor",
    "kl/above_free_nats",
)


@dataclasses.dataclass(frozen=True)
class ConstantActionPhase:
    """Frame counts of the entry and the final exit (``None``: never entered, or not left by the last row)."""

    entered: int | None
    left: int | None
    relapses: int
    at_exit: dict[str, float]


def constant_action_phase(metrics: pd.DataFrame, threshold: float = 0.9) -> ConstantActionPhase | None:
    """The constant-action phase of one run's ``metrics.csv`` table (``None`` without ``actor/saturated_fraction``).

    ``metrics``: rows in logging order with a ``frames`` column; rows without the saturation value (evaluations)
    are ignored.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold} is not a fraction in (0, 1]")
    if SATURATED_COLUMN not in metrics:
        return None
    rows = metrics.dropna(subset=[SATURATED_COLUMN]).reset_index(drop=True)
    inside = (rows[SATURATED_COLUMN] >= threshold).to_numpy()
    if not inside.any():
        return ConstantActionPhase(entered=None, left=None, relapses=0, at_exit={})
    first, last = int(inside.argmax()), len(inside) - 1 - int(inside[::-1].argmax())
    # A fall back: a row in the phase right after one outside it, once the run had entered.
    relapses = int((inside[first + 1 :] & ~inside[first:-1]).sum())
    entered = int(rows["frames"].iloc[first])
    if last == len(rows) - 1:
        return ConstantActionPhase(entered=entered, left=None, relapses=relapses, at_exit={})
    left = int(rows["frames"].iloc[last + 1])
    after = rows.iloc[last + 1 :]
    exit_rows = after[after["frames"] == left]
    at_exit = {name: float(exit_rows[name].mean()) for name in EXIT_DIAGNOSTICS if name in exit_rows}
    return ConstantActionPhase(entered=entered, left=left, relapses=relapses, at_exit=at_exit)
