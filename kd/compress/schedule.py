"""Sparsity schedules of magnitude pruning: the target sparsity after a given optimizer step.

Pure functions of the step, so a schedule can be checked on paper and a resumed run lands on the
same targets. Steps count optimizer steps (``trainer.global_step``): step ``t`` is the state
after ``t`` optimizer updates. Every schedule is piecewise constant and non-decreasing, and
reaches ``final`` exactly at ``end_step`` (``start_step`` for one-shot pruning).

- ``agp_sparsity``: Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning
  for model compression", ICLR Workshops 2018, arXiv:1710.01878, eq. (1).
- ``iterative_sparsity``: the geometric rounds of iterative pruning, Han et al., "Learning both
  Weights and Connections for Efficient Neural Networks", NeurIPS 2015, arXiv:1506.02626, as used
  by Frankle & Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural
  Networks", ICLR 2019, arXiv:1803.03635 (each round removes the same share of what is left).
- ``one_shot_sparsity``: everything at once.
"""

from __future__ import annotations


def _check(initial: float, final: float, start_step: int, end_step: int, **counts: int) -> None:
    """Checks a schedule's arguments; ``counts`` (``frequency=``, ``rounds=``) must be >= 1."""
    for name, value in counts.items():
        _check_count(name, value)
    if not 0.0 <= initial <= final < 1.0:
        raise ValueError(f"need 0 <= initial <= final < 1, got initial={initial}, final={final}")
    if end_step <= start_step or start_step < 0:
        raise ValueError(f"need 0 <= start_step < end_step, got {start_step}, {end_step}")


def _check_count(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def agp_event_steps(start_step: int, end_step: int, frequency: int) -> list[int]:
    """The steps at which the AGP target changes: ``t0, t0 + Δt, ...`` and exactly ``end_step``.

    Args:
        start_step: ``t0``, the first event.
        end_step: The last event, where the target is ``final``; when ``end_step - t0`` is not a
            multiple of ``frequency`` the last interval is shorter than ``Δt``.
        frequency: ``Δt``, optimizer steps between events, >= 1.

    Returns:
        The increasing event steps, ``start_step`` first and ``end_step`` last.
    """
    _check_count("frequency", frequency)
    return [*range(start_step, end_step, frequency), end_step]


def agp_sparsity(step: int, initial: float, final: float, start_step: int, end_step: int, frequency: int) -> float:
    """Automated gradual pruning (Zhu & Gupta 2017, arXiv:1710.01878, eq. 1).

    ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3`` for ``t`` in ``{t0, t0 + Δt, ...,
    t0 + n Δt}``, with ``n Δt = end_step - t0``. Between events the target stays at the last
    event's value; before ``t0`` it is ``s_i`` and from ``end_step`` on ``s_f``. The last event
    is placed on ``end_step`` itself (see ``agp_event_steps``), so the target is reached there
    even when ``end_step - t0`` is not a multiple of ``Δt``; when it is, this is eq. (1) exactly.
    The cube prunes fast while the network is redundant and slowly near the target.

    Args:
        step: Optimizer steps taken, ``t``.
        initial: ``s_i``, sparsity at ``t0``, in ``[0, final]``.
        final: ``s_f``, the target sparsity, in ``[initial, 1)``.
        start_step: ``t0``.
        end_step: ``t0 + n Δt``, the step at which the target reaches ``final``.
        frequency: ``Δt``, optimizer steps between events, >= 1.

    Returns:
        The target sparsity after ``step`` steps.

    Raises:
        ValueError: On sparsities outside ``0 <= initial <= final < 1``, ``end_step <= start_step``
            or ``frequency < 1``.
    """
    _check(initial, final, start_step, end_step, frequency=frequency)
    if step < start_step:
        return initial
    if step >= end_step:
        return final
    event = start_step + (step - start_step) // frequency * frequency  # latest event <= step
    progress = (event - start_step) / (end_step - start_step)  # (t - t0) / (n Δt), in [0, 1)
    return final + (initial - final) * (1.0 - progress) ** 3


def iterative_event_steps(start_step: int, end_step: int, rounds: int) -> list[int]:
    """The steps of the ``rounds`` pruning rounds, evenly spaced, the last on ``end_step``.

    Round ``k`` (1-based) is at ``start_step + floor(k (end_step - start_step) / rounds)``: the
    network trains for a period before each round, as in train-prune-retrain.
    """
    _check_count("rounds", rounds)
    span = end_step - start_step
    return [start_step + k * span // rounds for k in range(1, rounds + 1)]


def iterative_sparsity(step: int, initial: float, final: float, start_step: int, end_step: int, rounds: int) -> float:
    """Iterative pruning in geometric rounds (Han et al. 2015; Frankle & Carbin 2019).

    Each of the ``rounds`` rounds removes the same fraction of the weights still there, so after
    round ``k`` the weights kept are ``(1 - s_i) ((1 - s_f) / (1 - s_i))^(k / rounds)``; with
    ``s_i = 0`` the sparsity is ``1 - (1 - s_f)^(k / rounds)`` (Frankle & Carbin prune
    ``p^(1/n)`` percent per round). Rounds are at ``iterative_event_steps``; the target is ``s_i``
    before the first round and ``s_f`` from ``end_step`` on.

    Args:
        step: Optimizer steps taken.
        initial: ``s_i``, sparsity before the first round, in ``[0, final]``.
        final: ``s_f``, sparsity after the last round, in ``[initial, 1)``.
        start_step: Start of the pruning period (no round here; the first is one period later).
        end_step: Step of the last round.
        rounds: Number of rounds, >= 1.

    Returns:
        The target sparsity after ``step`` steps.

    Raises:
        ValueError: On sparsities outside ``0 <= initial <= final < 1``, ``end_step <= start_step``
            or ``rounds < 1``.
    """
    _check(initial, final, start_step, end_step, rounds=rounds)
    if step >= end_step:
        return final
    # rounds done: the largest k with floor(k * span / rounds) <= step - start_step
    d = step - start_step
    done = 0 if d < 0 else min(rounds, ((d + 1) * rounds - 1) // (end_step - start_step))
    if done == 0:
        return initial
    kept = (1.0 - initial) * ((1.0 - final) / (1.0 - initial)) ** (done / rounds)
    return 1.0 - kept


def one_shot_sparsity(step: int, initial: float, final: float, start_step: int) -> float:
    """One-shot pruning: ``s_i`` before ``start_step``, ``s_f`` from ``start_step`` on.

    Args:
        step: Optimizer steps taken.
        initial: Sparsity before ``start_step``, in ``[0, final]``.
        final: Sparsity from ``start_step`` on, in ``[initial, 1)``.
        start_step: The step at which all pruning happens, >= 0.

    Returns:
        The target sparsity after ``step`` steps.
    """
    _check(initial, final, start_step, start_step + 1)
    return final if step >= start_step else initial
