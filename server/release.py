"""Releases: a committed round's trainable state written as files transformers and peft load.

    <release>/base/      the frozen base (HF directory: config, safetensors, tokenizer)
    <release>/adapter/   PEFT adapter: LoRA A and B (attention, experts, shared experts and dense
                         MLPs, head) + the trained router (modules_to_save)
    <release>/merged/    base with the adapter merged in (plain `AutoModelForCausalLM`)
    <release>/release.json   round, validation losses, sha256 of every file, and the sha256 of
                             the trainable state it was made from (as server/checkpoint.py
                             commits it: the hub re-exports a folder that is not this round's)

    model = AutoModelForCausalLM.from_pretrained("<release>/base")
    model = PeftModel.from_pretrained(model, "<release>/adapter")

`out` may be missing, an empty folder, or a release (a folder whose files are exactly those its
release.json lists); anything else is refused before anything is written, so a mistyped `--out`
never costs a user's files. The release is written into a sibling staging folder and swapped
into place in one rename (renameat2 RENAME_EXCHANGE where the kernel has it), so a crash or a
full disk at any point leaves the release that was there before, whole.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from model.base import LORA_INIT, MANIFEST, load_base
from model.io import atomic_write_json, sha256_file, tensors_to_bytes
from server.faults import kill_point


def _merge(model: torch.nn.Module) -> torch.nn.Module:
    """The adapter merged into the base; an adapted output head is untied from the embedding first
    (its LoRA changes only the output side, model/lora.py)."""
    peft_head = model.get_output_embeddings()
    head = getattr(peft_head, "base_layer", None)
    if head is not None and model.config.tie_word_embeddings:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    return model.merge_and_unload()


class ReleaseError(RuntimeError):
    """`out` cannot take the release: it holds something else, or the disk refused the write."""


@dataclass(frozen=True)
class Release:
    path: Path
    round: int
    files: dict[str, str]  # relative path -> sha256


def export_release(
    base_path: Path,
    state: dict[str, torch.Tensor],
    out: Path,
    *,
    round: int,
    val_loss: dict[str, float] | None = None,
) -> Release:
    """Write the release into `out`: built in a staging folder beside it, then swapped into place.

    ReleaseError (one line, naming `out`) when `out` is not a release, or when the disk refuses
    a write (ENOSPC, ...): the staging folder is removed and whatever was at `out` stays as it was.
    """
    out = Path(os.path.abspath(out))  # "." and "../x" name their folder too
    check_release_target(out)
    _restore_interrupted_swap(out)
    staging = out.with_name(f".{out.name}.staging")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        files = _write(base_path, state, staging, round, val_loss)
        _sync_tree(staging)
        _swap_into_place(staging, out)
    except (OSError, SafetensorError) as exc:  # safetensors reports a failed write as its own error
        shutil.rmtree(staging, ignore_errors=True)
        kept = "the release already there is unchanged" if (out / RELEASE_INFO).is_file() else "nothing was written"
        raise ReleaseError(f"{out}: cannot write the release of round {round} ({_reason(exc)}); {kept}") from None
    return Release(out, round, files)


RELEASE_INFO = "release.json"


def check_release_target(out: Path) -> None:
    """Refuse (ReleaseError) an `out` that exists and is not a fedmoe release: a file, or a folder
    holding anything its release.json does not list. Missing or an empty folder is fine."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ReleaseError(f"{out}: exists and is not a folder; refusing to replace it with a release")
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        info = json.loads((out / RELEASE_INFO).read_text())
        listed = set(info["sha256"]) | {RELEASE_INFO}
    except (OSError, ValueError, KeyError, TypeError):
        raise ReleaseError(
            f"{out}: exists and is not a fedmoe release (no readable {RELEASE_INFO}); refusing to replace it: "
            "choose another --out or empty it yourself"
        ) from None
    foreign = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir() and str(p.relative_to(out)) not in listed)
    if foreign:
        raise ReleaseError(
            f"{out}: holds {foreign[0]!r}, which is not part of the release it holds; refusing to replace it: "
            "move that file or choose another --out"
        )


def _write(
    base_path: Path, state: dict[str, torch.Tensor], staging: Path, round: int, val_loss: dict[str, float] | None,
) -> dict[str, str]:
    """The release's files in `staging`; returns relative path -> sha256 (release.json aside)."""
    base = load_base(base_path)
    shutil.copytree(base_path, staging / "base", ignore=shutil.ignore_patterns(LORA_INIT, MANIFEST, ".*"))
    lora = base.with_lora()
    lora.set_state(state)
    # the release ships its base, so the adapter need not carry the (tied) head weight again
    lora.model.save_pretrained(staging / "adapter", save_embedding_layers=False)
    # Point the adapter at the release's own base, relative, so the release folder can move.
    adapter_config = staging / "adapter" / "adapter_config.json"
    config = json.loads(adapter_config.read_text())
    config["base_model_name_or_path"] = "../base"
    adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    kill_point("mid-export")  # base and adapter staged; merged, release.json and the swap not yet
    merged = _merge(lora.model)
    merged.save_pretrained(staging / "merged")
    base.tokenizer.save_pretrained(staging / "merged")

    files = {
        str(p.relative_to(staging)): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()
    }
    atomic_write_json(
        staging / RELEASE_INFO,
        {"round": round, "base_sha256": base.sha256, "val_loss": val_loss or {}, "sha256": files,
         "state_sha256": hashlib.sha256(tensors_to_bytes(state, torch.float32)).hexdigest()},
    )
    return files


def _sync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, so the swap never publishes unwritten data."""
    for path in [*sorted(folder.rglob("*")), folder]:
        _sync(path)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _previous(out: Path) -> Path:
    return out.with_name(f".{out.name}.previous")


def _swap_into_place(staging: Path, out: Path) -> None:
    """Make `staging` the folder at `out` in one step; the release it replaces is then deleted.

    With RENAME_EXCHANGE the two folders trade places atomically. Without it (another OS, a
    filesystem that refuses it) the old release is first renamed aside to .<name>.previous;
    a crash between the two renames leaves it there, and the next export puts it back first."""
    if out.exists() and _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # now the old release
    elif out.exists():
        shutil.rmtree(_previous(out), ignore_errors=True)
        out.rename(_previous(out))
        staging.rename(out)
        shutil.rmtree(_previous(out), ignore_errors=True)
    else:
        staging.rename(out)
    _sync(out.parent)


def _restore_interrupted_swap(out: Path) -> None:
    """A crash between the fallback's two renames left the old release aside: put it back."""
    if not out.exists() and (_previous(out) / RELEASE_INFO).is_file():
        _previous(out).rename(out)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False when the OS or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _reason(exc: Exception) -> str:
    """A failed write in a few words: its strerror ('No space left on device'), else its first line."""
    strerror = exc.strerror if isinstance(exc, OSError) else None
    return strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
