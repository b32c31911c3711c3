"""Checkpoints that never unpickle and never lose a user's data.

A checkpoint ``NAME`` is two files: ``NAME.safetensors`` (model weights and buffers) and
``NAME.state.pt`` (optimizer, scheduler, scaler, EMA weights, RNG states, epoch, metrics: only
tensors and plain Python values, read back with ``torch.load(weights_only=True)``). Every write
goes to a temporary file first and is renamed into place, so an interrupted run leaves the
previous checkpoint whole.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .models.from_timm import is_added


def atomic_write(path: str, write) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: a kill mid-write leaves the old ``path`` whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class RunBusyError(FileExistsError):
    """Another live process holds the run's lock (it is training into that directory now)."""


@contextlib.contextmanager
def run_lock(run_dir: str):
    """Hold an exclusive lock on ``run_dir`` for a whole run: a second process training into the
    same directory gets :class:`RunBusyError` at once instead of overwriting this run's files.
    The lock (``flock`` on ``run_dir/.lock``) goes with the process, even after ``kill -9``."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, ".lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunBusyError(f"{run_dir} is being written by {holder}: wait for it to finish, or use "
                               "another name= (nothing was touched)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(run_dir: str) -> Optional[str]:
    """Who holds ``run_dir``'s lock now (``'pid N'``), or None when no live process does."""
    path = os.path.join(run_dir, ".lock")
    if not os.path.isfile(path):
        return None
    try:
        with run_lock(run_dir):
            return None
    except RunBusyError:
        with open(path) as f:
            return f.read().strip() or "another process"


def save_weights(model: nn.Module, path: str, metadata: Optional[dict] = None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(state, p, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def read_weights(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: weights are read from .safetensors files only (nothing is unpickled)")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def load_pretrained(model: nn.Module, path: str) -> list:
    """Start fine-tuning from a timm ViT's (or an AdaptiVision run's) weights: the modules
    AdaptiVision adds (DTC, AFA's f_m, CMTF) start fresh, and a classifier of another size is
    left out (timm does the same). Anything else that does not fit raises, naming the keys.
    Returns notes on what was not loaded."""
    state, own, notes = read_weights(path), model.state_dict(), []
    head = sorted(k for k in state if k.startswith("head.") and k in own and state[k].shape != own[k].shape)
    if head:
        notes.append(f"{', '.join(head)}: another number of classes in {path}; the new classifier starts fresh")
        state = {k: v for k, v in state.items() if k not in head}
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not is_added(k) and k not in head)
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if unexpected or missing or shapes:
        raise ValueError(f"--init-from {path} does not fit {type(model).__name__}: not in the model "
                         f"{unexpected[:8]}, missing from the file {missing[:8]}, shape mismatch {shapes[:8]}")
    added = sorted(k for k in set(own) - set(state) if is_added(k))
    if added:
        notes.append(f"{len(added)} AdaptiVision tensors (DTC, AFA, CMTF) are not in {path}: they start fresh")
    model.load_state_dict(state, strict=False)
    return notes


def load_weights(model: nn.Module, path: str, strict: bool = True) -> None:
    """Load safetensors weights; a mismatch names the keys and shapes that differ."""
    state = read_weights(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if shapes or (strict and (missing or unexpected)):
        lines = [f"checkpoint {path} does not fit the model:"]
        for title, items in (("shape mismatch", shapes), ("missing in checkpoint", missing),
                             ("not in model", unexpected)):
            if items:
                more = f" (+{len(items) - 12} more)" if len(items) > 12 else ""
                lines.append(f"  {title}: " + "; ".join(items[:12]) + more)
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=strict)


def rng_state() -> dict:
    """Every generator a run draws from: torch, python, numpy (timm's Mixup / CutMix) and CUDA."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "numpy" in state:  # (absent in checkpoints written before it was recorded)
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _pair_epoch(base: str) -> Optional[int]:
    """The epoch of checkpoint ``base`` if its two files exist and agree (weights written
    before epochs were recorded in them are taken on trust), else None."""
    if not (os.path.isfile(base + ".safetensors") and os.path.isfile(base + ".state.pt")):
        return None
    try:
        with safe_open(base + ".safetensors", "pt") as f:
            tagged = (f.metadata() or {}).get("epoch")
        epoch = torch.load(base + ".state.pt", map_location="cpu", weights_only=True)["epoch"]
    except Exception:  # unreadable or truncated: not a usable pair
        return None
    return epoch if tagged is None or int(tagged) == epoch else None


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


STATE_KEYS = ("epoch", "num_updates", "best_top1", "rng", "optimizer")


class CheckpointManager:
    """Writes ``epoch-NNNN`` checkpoints into ``run_dir``, keeps the last ``keep_last`` and a
    copy of the best as ``best``; ``last`` names the newest."""

    def __init__(self, run_dir: str, keep_last: int = 2, metadata: Optional[dict] = None):
        self.run_dir, self.keep_last = run_dir, keep_last
        self.metadata = metadata or {}  # written into every weights file (the model spec: loadable alone)

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def save(self, name: str, model: nn.Module, state: dict, is_best: bool = False) -> str:
        base = self.path(name)
        # both files carry the epoch, so a pair torn apart by a kill between the two renames of
        # `last` is recognised on resume (see latest())
        save_weights(model, base + ".safetensors", metadata=dict(self.metadata, epoch=state["epoch"]))
        atomic_write(base + ".state.pt", lambda p: torch.save(state, p))
        for link in (["last"] + (["best"] if is_best else [])):
            for ext in (".safetensors", ".state.pt"):
                atomic_write(self.path(link) + ext, lambda p, ext=ext: shutil.copyfile(base + ext, p))
        self._prune()
        return base

    def _prune(self) -> None:
        epochs = sorted(glob.glob(self.path("epoch-*.safetensors")),
                        key=lambda p: int(re.search(r"epoch-(\d+)", p).group(1)))
        for old in epochs[:-self.keep_last]:
            for ext in (".safetensors", ".state.pt"):
                stem = old[: -len(".safetensors")]
                if os.path.exists(stem + ext):
                    os.remove(stem + ext)

    def remove_orphans(self) -> list:
        """Delete temporary files (``*.tmpPID``) of writes that a killed process left behind.
        Call it while holding the run's lock (no other writer can be mid-write)."""
        orphans = [p for p in glob.glob(self.path("*.tmp*")) if re.search(r"\.tmp\d+$", p)]
        for p in orphans:
            os.remove(p)
        return orphans

    def latest(self) -> tuple[str, Optional[str]]:
        """Base path of the newest checkpoint whose weights and state belong to the same epoch:
        ``last`` normally; after a kill between its two renames, the newest ``epoch-NNNN`` pair
        that agrees. Returns (base, note about the fallback or None)."""
        epochs = sorted(glob.glob(self.path("epoch-*.safetensors")), reverse=True,
                        key=lambda p: int(re.search(r"epoch-(\d+)", p).group(1)))
        for base in [self.path("last")] + [p[: -len(".safetensors")] for p in epochs]:
            if _pair_epoch(base) is not None:
                note = None if base == self.path("last") else (
                    f"{self.path('last')}.* are from different epochs (interrupted write): "
                    f"resuming from {os.path.basename(base)}")
                return base, note
        raise FileNotFoundError(f"no checkpoint in {self.run_dir} has weights and training state of the same "
                                "epoch: the run cannot be resumed exactly (start it again, or init_from= its weights)")

    @staticmethod
    def load_state(base: str) -> dict:
        path = base + ".state.pt"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"training state {path} does not exist (needed to resume)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, or not a torch file: weights_only refuses anything else
            raise ValueError(f"training state {path} is unreadable ({type(e).__name__}: {e}); "
                             "resume from an earlier epoch-NNNN checkpoint or start again") from e
        missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise ValueError(f"training state {path} lacks {missing}: not a state written by adaptivision train")
        return state
