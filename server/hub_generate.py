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

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer


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
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Stop(StoppingCriteria):
    def __init__(self, keep_going: Callable[[], bool]) -> None:
        self.keep_going = keep_going

    def __call__(self, input_ids, scores, **kwargs) -> bool:  # noqa: ANN001, ANN003
        return not self.keep_going()


class Generator:
    def __init__(self) -> None:
        self._loaded: _Loaded | None = None
        self._lock = threading.Lock()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def _load(self, folder: Path) -> _Loaded:
        merged = folder / "merged"
        stamp = (folder / "release.json").stat().st_mtime
        with self._lock:
            if self._loaded is not None and self._loaded.folder == folder and self._loaded.stamp == stamp:
                return self._loaded
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            model = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype).to(self.device).eval()
            self._loaded = _Loaded(folder, stamp, model, AutoTokenizer.from_pretrained(merged))
            return self._loaded

    def count(self, folder: Path, prompt: str) -> int:
        return len(self._load(folder).tokenizer(prompt)["input_ids"])

    def stream(self, folder: Path, prompt: str, max_new_tokens: int, counts: Counts,
               keep_going: Callable[[], bool] = lambda: True) -> Iterator[str]:
        """Text pieces as they are decoded; `counts` holds the exact token counts when it ends."""
        loaded = self._load(folder)
        ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.device)
        counts.prompt_tokens = int(ids.shape[1])
        streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        out: dict[str, torch.Tensor] = {}

        def run() -> None:
            try:
                with torch.no_grad():
                    out["ids"] = loaded.model.generate(
                        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                        streamer=streamer, stopping_criteria=StoppingCriteriaList([_Stop(keep_going)]),
                        pad_token_id=loaded.tokenizer.eos_token_id if loaded.tokenizer.eos_token_id is not None else 0)
            finally:
                streamer.end()

        with loaded.lock:  # one generation per loaded model at a time
            worker = threading.Thread(target=run, name="hub-generate", daemon=True)
            worker.start()
            try:
                yield from (piece for piece in streamer if piece)
            finally:
                worker.join()
        if "ids" not in out:
            raise RuntimeError("generation failed (see the hub's log)")
        counts.completion_tokens = int(out["ids"].shape[1]) - counts.prompt_tokens
