"""The adaptive schedule: deterministic decisions from given loss histories, within its budgets."""

from __future__ import annotations

import pytest
import torch

from aggregation.schedule import Decision, RoundRecord, Schedule, decide, update_drift

ADAPTIVE = Schedule(mode="adaptive", min_steps=2, max_steps=40)


def history(*losses: float, steps: int = 12, members: int = 3, drifts: tuple = (), seconds_per_step: float = 0.5,
            bytes_per_member: float = 1e6) -> list[RoundRecord]:
    rounds = [RoundRecord(0, 0, 0, losses[0], 0.0, 0.0)]
    for i, loss in enumerate(losses[1:], start=1):
        drift = drifts[i - 1] if i - 1 < len(drifts) else None
        rounds.append(RoundRecord(i, steps, members, loss, bytes_per_member, seconds_per_step, drift))
    return rounds


def decision(rounds: list[RoundRecord], schedule: Schedule = ADAPTIVE, **kwargs: int) -> Decision:
    args = {"local_steps": 12, "members_per_round": 0, "min_members": 2} | kwargs
    return decide(rounds, schedule, **args)


def test_a_fixed_schedule_keeps_the_configured_values() -> None:
    assert decision(history(5.0, 6.0), Schedule()) == Decision(12, 0, "fixed schedule")


def test_loss_driven_decisions() -> None:
    assert decision(history(5.0)).local_steps == 12  # nothing trained yet
    rose = decision(history(5.0, 5.1))
    assert rose.local_steps == 6 and "rose 2.00%" in rose.reason
    slow = decision(history(5.0, 4.99))
    assert slow.local_steps == 18 and "fell only 0.20%" in slow.reason
    good = decision(history(5.0, 4.5))
    assert good.local_steps == 12 and "fell 10.00%: keep" in good.reason
    # the round's own steps are the base: 18 after a slow round, then 27 after another
    assert decision(history(5.0, 4.99, 4.985, steps=18)).local_steps == 27
    assert decision(history(5.0, 4.99, steps=39)).local_steps == 40  # max-steps
    assert decision(history(5.0, 5.5, steps=3)).local_steps == 2  # min-steps


def test_a_jump_in_members_disagreement_halves_the_steps_even_while_loss_falls() -> None:
    jumped = decision(history(5.0, 4.5, 4.0, drifts=(0.4, 1.0)))
    assert jumped.local_steps == 6 and "2.5x more" in jumped.reason
    assert decision(history(5.0, 4.5, 4.0, drifts=(0.4, 0.5))).local_steps == 12


def test_budgets_cap_steps_and_members_but_never_below_min_members() -> None:
    timed = decision(history(5.0, 4.99, seconds_per_step=1.0), Schedule("adaptive", round_seconds=10.0))
    assert timed.local_steps == 10 and "10s training budget" in timed.reason
    sized = decision(history(5.0, 4.5, bytes_per_member=2e6), Schedule("adaptive", round_bytes=7_000_000))
    assert sized.members_per_round == 3 and "fit the 7000000 B budget" in sized.reason
    tight = decision(history(5.0, 4.5, bytes_per_member=2e6), Schedule("adaptive", round_bytes=3_000_000))
    assert tight.members_per_round == 2 and "fewer than min-members" in tight.reason
    assert decision(history(5.0, 4.5), Schedule("adaptive", round_bytes=10**9), members_per_round=4).members_per_round == 4


def test_decisions_are_deterministic() -> None:
    rounds = history(5.0, 4.99, 4.9, 4.95, drifts=(0.3, 0.3, 0.4))
    assert len({decision(rounds) for _ in range(5)}) == 1


def test_drift_is_members_spread_around_their_mean() -> None:
    same = {"a": torch.ones(4)}
    assert update_drift([same, same]) == 0.0
    assert update_drift([{"a": torch.tensor([1.0, 0.0])}, {"a": torch.tensor([0.0, 1.0])}]) == pytest.approx(1.0)
    assert update_drift([same]) is None
    assert update_drift([{"a": torch.ones(2)}, {"b": torch.ones(2)}]) is None  # nothing shared


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="schedule must be one of"):
        Schedule(mode="cosine")
    with pytest.raises(ValueError, match="schedule-min-steps"):
        Schedule(min_steps=10, max_steps=5)
