from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.checkpoint import Checkpoints
from server.history import PATH, PublicHistory, change_name


def _states(rounds: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}]
    for _ in range(rounds):
        states.append({k: v + torch.randn(v.shape, generator=g) for k, v in states[-1].items()})
    return states


@pytest.mark.parametrize("window", [0, 3, 8])
def test_a_resumed_run_rebuilds_the_same_references_from_its_committed_rounds(tmp_path: Path, window: int) -> None:
    states = _states(5)
    checkpoints = Checkpoints(tmp_path)
    live = PublicHistory(window, states[0])
    checkpoints.commit(0, states[0], {})
    assert PublicHistory.from_checkpoints(checkpoints, 0, window).references() == {} == live.references()
    for rnd in range(1, 6):
        live.record(rnd, states[rnd - 1], states[rnd])
        checkpoints.commit(rnd, states[rnd], {})
    rebuilt = PublicHistory.from_checkpoints(checkpoints, 5, window).references()
    expected = live.references()
    assert list(rebuilt) == list(expected) == [change_name(r) for r in range(5, 5 - min(window, 5), -1)] + [PATH]
    for name, tensors in expected.items():
        assert set(rebuilt[name]) == set(tensors)
        for k, v in tensors.items():
            assert torch.equal(rebuilt[name][k], v), (name, k)
    assert torch.equal(expected[PATH]["b"], states[5]["b"] - states[0]["b"])
    if window:
        assert torch.equal(expected[change_name(5)]["a"], states[5]["a"] - states[4]["a"])
