"""A member daemon's Prometheus metrics: training throughput per round, recorded by the ClientApp
into the node's state dir, and served by `fedmoe join` with GPU readings taken at scrape time.

Flower runs the ClientApp in a process of its own (per run), so the long-lived `fedmoe join`
process serves the endpoint and reads `<state-dir>/metrics.json` on every scrape:

    {"member": ..., "rounds_trained": 3, "tokens": ..., "train_seconds": ..., "steps": ...,
     "last_round": 3, "tokens_per_second": ..., "step_seconds": ..., "train_loss": ...,
     "precision": "bf16 on cuda", "gpu_memory_peak_bytes": ..., "gpu_memory_reserved_bytes": ...,
     "dp_epsilon": ...}   (record-level DP only: the budget spent so far)

GPU utilization and memory in use come from NVML (`pynvml`, optional) when it is importable;
peak/reserved memory of the training process from `torch.cuda` when CUDA is present. Every
metric is documented in docs/deployment.md.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from client.caches import warn_rebuilt
from model.io import atomic_write_json

METRICS_FILE = "metrics.json"


def gpu_memory() -> dict[str, int]:
    """Peak and reserved CUDA memory of this process since the last call (empty without CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return {}
        out = {
            "gpu_memory_peak_bytes": int(torch.cuda.max_memory_allocated()),
            "gpu_memory_reserved_bytes": int(torch.cuda.memory_reserved()),
        }
        torch.cuda.reset_peak_memory_stats()
        return out
    except (ImportError, RuntimeError):
        return {}


def record_round(
    state_dir: Path,
    *,
    member: str,
    round: int,
    num_tokens: int,
    seconds: float,
    local_steps: int,
    train_loss: float,
    precision: str,
    gpu: dict[str, int] | None = None,
    dp_epsilon: float | None = None,
) -> dict[str, Any]:
    """Add one trained round to `<state_dir>/metrics.json` (atomic replace) and return it."""
    path = state_dir / METRICS_FILE
    try:
        totals = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        totals = {}  # a damaged metrics file only restarts the counters
        warn_rebuilt(path, "metrics", (str(exc).splitlines() or [type(exc).__name__])[0], "restarting the counters")
    seconds = max(float(seconds), 1e-9)
    totals.update({
        "member": member,
        "rounds_trained": int(totals.get("rounds_trained", 0)) + 1,
        "tokens": int(totals.get("tokens", 0)) + int(num_tokens),
        "train_seconds": float(totals.get("train_seconds", 0.0)) + seconds,
        "steps": int(totals.get("steps", 0)) + int(local_steps),
        "last_round": int(round),
        "tokens_per_second": num_tokens / seconds,
        "step_seconds": seconds / max(local_steps, 1),
        "train_loss": float(train_loss),
        "precision": precision,
        **(gpu or {}),
        **({"dp_epsilon": float(dp_epsilon)} if dp_epsilon is not None else {}),
    })
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, totals)
    return totals


class DaemonCollector:
    """Prometheus collector over the node's metrics file (+ NVML when available)."""

    def __init__(self, state_dir: Path, member: str) -> None:
        self.path = state_dir / METRICS_FILE
        self.member = member

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            return {}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        data = self._read()
        labels = ["member"]
        info = InfoMetricFamily("fedmoe_daemon", "Member daemon", labels=labels)
        info.add_metric([self.member], {"precision": str(data.get("precision", ""))})
        yield info
        counters = [
            ("fedmoe_daemon_rounds_trained", "Rounds this member trained", "rounds_trained"),
            ("fedmoe_daemon_tokens", "Tokens trained on", "tokens"),
            ("fedmoe_daemon_train_seconds", "Wall time spent training", "train_seconds"),
            ("fedmoe_daemon_steps", "Optimizer steps taken", "steps"),
        ]
        for name, doc, key in counters:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric([self.member], float(data.get(key, 0)))
            yield family
        gauges = [
            ("fedmoe_daemon_last_round", "Last round trained", "last_round"),
            ("fedmoe_daemon_tokens_per_second", "Training throughput in the last round", "tokens_per_second"),
            ("fedmoe_daemon_step_seconds", "Mean optimizer step time in the last round", "step_seconds"),
            ("fedmoe_daemon_train_loss", "Mean training loss in the last round", "train_loss"),
            ("fedmoe_daemon_dp_epsilon", "Record-level DP: epsilon this member has spent so far (node config dp on)",
             "dp_epsilon"),
            ("fedmoe_daemon_gpu_memory_peak_bytes", "Peak CUDA memory of the last round (torch)", "gpu_memory_peak_bytes"),
            ("fedmoe_daemon_gpu_memory_reserved_bytes", "CUDA memory reserved after the last round (torch)",
             "gpu_memory_reserved_bytes"),
        ]
        for name, doc, key in gauges:
            if key in data:
                family = GaugeMetricFamily(name, doc, labels=labels)
                family.add_metric([self.member], float(data[key]))
                yield family
        yield from _nvml(self.member)


def _nvml(member: str) -> Iterator[Any]:
    """GPU utilization and memory in use per device, from NVML (nothing when unavailable)."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML library, no driver, no GPU: no GPU metrics
        return
    from prometheus_client.core import GaugeMetricFamily

    util = GaugeMetricFamily("fedmoe_daemon_gpu_utilization_ratio", "GPU busy fraction (NVML)", labels=["member", "gpu"])
    used = GaugeMetricFamily("fedmoe_daemon_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["member", "gpu"])
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            util.add_metric([member, str(i)], pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            used.add_metric([member, str(i)], float(pynvml.nvmlDeviceGetMemoryInfo(handle).used))
    except Exception:  # noqa: BLE001
        return
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    yield util
    yield used


def serve_daemon_metrics(state_dir: Path, member: str, port: int, addr: str = "127.0.0.1") -> None:
    """Serve the daemon's /metrics from a daemon thread of this process."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(DaemonCollector(state_dir, member))  # type: ignore[arg-type]
    start_http_server(port, addr=addr, registry=registry)
