"""Outputs of every registered model and every ``reduction=`` at fixed seeds (issue 12).

The forward path was redesigned (one stage protocol, a pure forward) under a promise to keep its
behaviour: ``tests/golden/forward.json`` holds these outputs as the code before the redesign
computed them (``python tests/forward_cases.py`` wrote it; the commit is in the file), and
``test_parity.py::test_forward_outputs_are_those_before_the_redesign`` compares to 1e-5.
Regenerate only on purpose, for a change of behaviour that a commit message explains.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import timm
import torch

import adaptivision  # noqa: F401  (registers the models)
from adaptivision.objective import cluster_loss

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "forward.json")
NANO = "adaptivision_nano_patch4_28"
# (name, model, kwargs, mode): every registered model at its defaults, then every reduction and
# clustering preset at nano size, in eval and (seeded) train mode, with guidance and dense outputs
CASES = [(f"{m}", m, {}, "eval") for m in sorted(timm.list_models("adaptivision_*"))]
CASES += [(f"nano {red} {mode}", NANO, dict(reduction=red), mode)
          for red in ("none", "random", "importance", "evit", "tome") for mode in ("eval", "train")]
# train_k='image': the per-image K in training that the snapshot was recorded with (the default
# became 'batch' later, on purpose: docs/results.md, "One K per training batch")
# condense_at=0 likewise: the nano model's stage moved after block 2 later, on purpose (docs/results.md,
# "The default job"); only the case of the model at its defaults follows that change.
# budget_jitter=1 in training: the jitter the snapshot was drawn with (the default became 0 later, on
# purpose: docs/results.md, "Without the budget jitter")
# prop_attn=True: the proportional attention the snapshot had for every DTC (off by default for per-image
# centres with soft assignment later, on purpose: docs/results.md, "Without proportional attention")
CASES += [(f"nano dtc {c} {mode}", NANO, dict(clustering=c, train_k="image", condense_at=0, budget_jitter=1.0,
                                               prop_attn=True), mode)
          for c in ("paper", "image", "image-soft") for mode in ("eval", "train")]
CASES += [
    ("nano two stages", NANO, dict(condense_at=[0, 3], clustering="image", train_k="image", budget_jitter=1.0), "train"),
    ("nano fixed K", NANO, dict(dynamic=False, clustering="paper", condense_at=0), "eval"),
    ("nano guided", NANO, dict(guidance_dim=16, guidance_tokens=2, align_dim=8, train_k="image", condense_at=0,
                               budget_jitter=1.0, prop_attn=True), "train"),
    ("nano avg pool", NANO, dict(global_pool="avg", clustering="paper", condense_at=0), "eval"),
    ("nano avg pool tome", NANO, dict(global_pool="avg", reduction="tome", tome_r=4), "eval"),
    ("nano unpool skip", NANO, dict(unpool="skip", condense_at=[1, 3], prop_attn=True), "dense"),
    ("nano unpool assign", NANO, dict(clustering="paper", condense_at=0, unpool="assign"), "dense"),
    ("nano tome dense", NANO, dict(reduction="tome", tome_r=4), "dense"),
    ("nano evit dense", NANO, dict(reduction="evit"), "dense"),
]


def _sum(t) -> float:
    return float(t.detach().double().sum()) if t is not None else 0.0


def outputs(name: str, model_name: str, kwargs: dict, mode: str) -> dict:
    """What one case computes: logits (B, 10) and checksums of everything else it returns."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10, **kwargs)
    c, h, w = model.pretrained_cfg["input_size"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, c, h, w, generator=g)
    fwd = {}
    if "guidance_dim" in kwargs:
        fwd["guidance"] = torch.randn(3, 4, kwargs["guidance_dim"], generator=g)
    # the learned output layers start at zero; perturb them so that they matter in the outputs
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modulator.fc_v." in n or ".w_o." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.train(mode == "train")
    torch.manual_seed(2)  # training-time randomness (budget jitter, random keep) from here
    if mode == "dense":
        with torch.no_grad():
            final, inters = model.forward_intermediates(x, indices=[1, 3, 5], **fwd)
        return dict(final=_sum(final), inters=[_sum(t) for t in inters],
                    inters_abs=[float(t.detach().double().abs().sum()) for t in inters])
    logits, aux = model(x, return_aux=True, **fwd)
    terms = aux.get("cluster") or []
    out = dict(logits=logits.double().flatten().tolist(), pooled=_sum(aux["pooled"]),
               align=_sum(aux.get("align")), reduction=_sum(aux.get("reduction")),
               num_clusters=aux["num_clusters"].flatten().tolist() if aux.get("num_clusters") is not None else [],
               cluster=[[_sum(zs), _sum(mu), float(tau)] for zs, mu, tau in terms])
    if mode == "train":  # gradients flow the same way
        loss = logits.square().mean() + (cluster_loss(terms, detach_tokens=False) if terms else 0)
        if aux.get("reduction") is not None:
            loss = loss + aux["reduction"]
        loss.backward()
        out["grad"] = sum(float(p.grad.double().abs().sum()) for p in model.parameters() if p.grad is not None)
    return out


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = dict(commit=commit, torch=torch.__version__, timm=timm.__version__,
                  cases={name: outputs(name, m, kw, mode) for name, m, kw, mode in CASES})
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
        json.dump(record, f, indent=0)
    print(f"wrote {len(record['cases'])} cases to {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    main()
