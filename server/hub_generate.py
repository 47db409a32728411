"""Hosted generation for the hub: a release's merged model, its own tokenizer, streamed text and the
exact token counts the usage log is debited with.

The model is the release's `merged/` folder (a plain `AutoModelForCausalLM`, the adapter folded
in) loaded once per release and kept while it is the newest one asked for (one model in memory;
a delayed member asking for an older release loads that one). Decoding is greedy, so the same
prompt gives the same text. Counts: prompt tokens are the release tokenizer's ids of the prompt,
completion tokens the ids `generate` appended (up to and including an end-of-sequence token); a
generation the caller abandons is stopped at the next token and charged for what was produced.
On a CUDA machine the model runs there in bf16; otherwise on the CPU in fp32.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


@dataclass
class Counts:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Loaded:
    folder: Path
    stamp: float
    model: torch.nn.Module
    tokenizer: object


class _Stop(StoppingCriteria):
    def __init__(self, keep_going: Callable[[], bool]) -> None:
        self.keep_going = keep_going

    def __call__(self, input_ids, scores, **kwargs) -> bool:  # noqa: ANN001, ANN003
        return not self.keep_going()


class _Pieces(BaseStreamer):
    """generate's streamer: the decoded new text, piece by piece, into `out` (on the worker)."""

    def __init__(self, tokenizer, out: queue.SimpleQueue, counts: Counts) -> None:  # noqa: ANN001
        self.tokenizer, self.out, self.counts, self.ids, self.said, self.prompt = tokenizer, out, counts, [], "", True

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:  # generate's first call carries the prompt
            self.prompt = False
            return
        self.ids.extend(value.reshape(-1).tolist())
        self.counts.completion_tokens = len(self.ids)  # what was produced so far, if generation fails later
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > len(self.said) and not text.endswith("\ufffd"):  # a whole character more
            self.out.put(text[len(self.said):])
            self.said = text

    def end(self) -> None:
        pass


class Generator:
    """Every model load and generation runs on one long-lived worker thread: torch's OpenMP pool
    belongs to the thread that uses it, and on a small machine the idle pools of other threads
    spin against the working one (measured: generation on a second thread ran at 0.44x of the
    first's speed; on one dedicated thread at full speed)."""

    def __init__(self) -> None:
        self._loaded: _Loaded | None = None
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._tokenizers: dict[tuple[Path, float], object] = {}
        self._tokenizers_lock = threading.Lock()
        self._worker = threading.Thread(target=self._serve, name="hub-generate", daemon=True)
        self._worker.start()

    def _serve(self) -> None:
        while True:
            job, done = self._jobs.get()
            try:
                done.put((True, job()))
            except BaseException as exc:  # noqa: BLE001  (handed to the caller)
                done.put((False, exc))

    def _load(self, folder: Path) -> _Loaded:
        """On the worker: the release's merged model, loaded once while it is the one asked for."""
        stamp = (folder / "release.json").stat().st_mtime
        if self._loaded is None or self._loaded.folder != folder or self._loaded.stamp != stamp:
            merged = folder / "merged"
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            model = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype).to(self.device).eval()
            self._loaded = _Loaded(folder, stamp, model, AutoTokenizer.from_pretrained(merged))
        return self._loaded

    def count(self, folder: Path, prompt: str) -> int:
        """The prompt's tokens with the release's tokenizer (loaded alone: the quota check comes
        before any model is loaded)."""
        key = (folder, (folder / "release.json").stat().st_mtime)
        with self._tokenizers_lock:
            tokenizer = self._tokenizers.get(key)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(folder / "merged")
                self._tokenizers = {key: tokenizer}  # the newest asked for
        return len(tokenizer(prompt)["input_ids"])

    def stream(self, folder: Path, prompt: str, max_new_tokens: int, counts: Counts,
               keep_going: Callable[[], bool] = lambda: True) -> Iterator[str]:
        """Text pieces as they are decoded; `counts` holds the exact token counts when it ends."""
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        end = object()

        def job() -> None:
            try:
                loaded = self._load(folder)
                ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.device)
                counts.prompt_tokens = int(ids.shape[1])
                pad = loaded.tokenizer.eos_token_id if loaded.tokenizer.eos_token_id is not None else 0
                with torch.no_grad():
                    out = loaded.model.generate(
                        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                        streamer=_Pieces(loaded.tokenizer, pieces, counts), pad_token_id=pad,
                        stopping_criteria=StoppingCriteriaList([_Stop(keep_going)]))
                counts.completion_tokens = int(out.shape[1]) - counts.prompt_tokens
            finally:
                pieces.put(end)

        done: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs.put((job, done))
        piece = None
        try:
            while (piece := pieces.get()) is not end:
                yield piece
        finally:  # also when the caller went away: the job stops at its next token; wait for its counts
            while piece is not end:
                piece = pieces.get()
            ok, value = done.get()
        if not ok:
            raise value
