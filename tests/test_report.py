"""`fedmoe report` and the cost formula on committed rounds written by server.checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedmoe.report import ReportError, write_report
from server.checkpoint import Checkpoints
from server.metrics import Prices, estimate_cost, manifest_cost


def _member(name: str, seconds: float, tokens: int) -> dict:
    return {"member": name, "node_id": 1, "bytes_down": 400_000, "bytes_up": 120_000, "num_tokens": tokens,
            "train_loss": 3.0, "seconds": seconds, "experts_sent": 4, "precision": "bf16 on cpu"}


def _run(run_dir: Path, *, shares: bool = True, secure: bool = False, dp: bool = False) -> Checkpoints:
    checkpoints = Checkpoints(run_dir)
    state = {"w": torch.zeros(4)}
    for rnd in range(4):
        members = [_member(m, 10.0 + rnd, 4096) for m in ("acme", "globex", "initech")] if rnd else []
        checkpoints.commit(rnd, state, {
            "time": f"2026-01-01T00:0{rnd}:00Z",
            "val_loss": {"code": 5.0 - 0.3 * rnd, "legal": 5.2 - 0.2 * rnd, "manuals": 5.1 - 0.1 * rnd},
            "members": members, "rejected": {"node 7": "bad"} if rnd == 2 else {},
            "bytes_up": sum(m["bytes_up"] for m in members), "bytes_down": sum(m["bytes_down"] for m in members),
            "seconds": 30.0 if rnd else 0.0,
            "shares": {"acme": 0.5, "globex": 0.3, "initech": 0.2} if rnd and shares else {},
            **({"dp_member_epsilon": 2.5 * rnd} if rnd and dp else {}),
            **({"timing": {"sample": 0.5, "broadcast": 1.0, "train": 22.0, "secure": 4.0, "evaluate": 2.5},
                "members_train_seconds": sum(m["seconds"] for m in members),
                "specialization": {"expert_top_member_share": None, "routing_entropy": {}} if secure else
                                  {"expert_top_member_share": 0.4 + 0.1 * rnd,
                                   "routing_entropy": {"acme": 0.9, "globex": 0.8, "initech": 0.7}}} if rnd else {}),
        })
    return checkpoints


def _nontrivial_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.is_file() and path.stat().st_size > 5_000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] >= 200 and pixels.shape[1] >= 300, pixels.shape
    assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 10  # not a blank canvas


def test_report_writes_four_nontrivial_plots_and_a_summary(tmp_path: Path) -> None:
    _run(tmp_path / "run")
    report = write_report(tmp_path / "run", tmp_path / "out", Prices(gpu_hour=2.5, million_tokens=0.4))
    assert set(report.plots) == {"loss", "bytes", "shares", "cost"}
    for path in report.plots.values():
        _nontrivial_png(path)
    text = report.summary.read_text()
    assert "| code | 5.0000 | 4.1000 | -0.9000 |" in text
    assert "## Contribution shares after round 3" in text and "| acme | 50.0% |" in text
    for path in report.plots.values():
        assert f"]({path.name})" in text
    # the cost in the summary is the documented formula over the manifests
    expected = sum(
        estimate_cost(30.0, [10.0 + r] * 3, 3 * 4096, Prices(gpu_hour=2.5, million_tokens=0.4)).total for r in (1, 2, 3)
    )
    assert f"**{expected:.4f} USD**" in text
    # where each round's time went: its stages, and the members' training against the wall time
    assert "## Where the round time went" in text
    assert "| 2 | 30.0 | 0.50 | 1.00 | 22.00 | 0.00 | 4.00 | 0.00 | 0.00 | 2.50 | 36.0 | 120% |" in text
    assert "| 3 | 70% | 0.90 | 0.80 | 0.70 |" in text


def test_report_skips_shares_with_a_note_when_contribution_was_off(tmp_path: Path) -> None:
    _run(tmp_path / "run", shares=False)
    report = write_report(tmp_path / "run", tmp_path / "out")
    assert "shares" not in report.plots and not (tmp_path / "out" / "shares.png").exists()
    assert any("shares.png skipped" in n for n in report.notes)
    assert any("no prices given" in n for n in report.notes)


def test_a_secure_run_reports_specialization_as_not_known_in_a_well_formed_table(tmp_path: Path) -> None:
    _run(tmp_path / "run", secure=True)
    text = write_report(tmp_path / "run", tmp_path / "out").summary.read_text()
    table = text.split("## Expert specialization")[1].split("\n\n")[1].splitlines()
    assert table[0] == "| round | top member's share of an expert |" and table[1] == "|---:|---:|"
    assert table[2:] == [f"| {r} | not known (secure) |" for r in (1, 2, 3)]


def test_a_run_with_member_level_dp_reports_the_epsilon_spent_after_each_round(tmp_path: Path) -> None:
    _run(tmp_path / "run", secure=True, dp=True)
    text = write_report(tmp_path / "run", tmp_path / "out").summary.read_text()
    table = text.split("## Member-level differential privacy")[1].split("\n\n")[2].splitlines()
    assert table == ["| round | ε spent |", "|---:|---:|", "| 1 | 2.500 |", "| 2 | 5.000 |", "| 3 | 7.500 |"]
    _run(tmp_path / "plain")
    assert "differential privacy" not in write_report(tmp_path / "plain", tmp_path / "out2").summary.read_text()


def test_report_of_a_run_with_nothing_committed_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no committed round"):
        write_report(tmp_path / "missing", tmp_path / "out")


def test_cost_formula() -> None:
    prices = Prices(gpu_hour=3.6, million_tokens=2.0, member_gpus=2.0, server_gpus=1.0)
    cost = estimate_cost(100.0, [50.0, 50.0], 500_000, prices)
    assert cost.gpu_hours == pytest.approx((2 * 100 + 100) / 3600)
    assert cost.compute == pytest.approx(3.6 * 300 / 3600) and cost.token == pytest.approx(1.0)
    assert manifest_cost({"round": 0, "members": []}, prices).total == 0.0
    assert Prices.from_env({"FEDMOE_PRICE_GPU_HOUR": "2.5"}).gpu_hour == 2.5
    with pytest.raises(ValueError, match="FEDMOE_PRICE_GPU_HOUR"):
        Prices.from_env({"FEDMOE_PRICE_GPU_HOUR": "cheap"})
