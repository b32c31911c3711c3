"""Whether a trained DynamicViT / ToFe model's keep-score predictors have saturated
(docs/results.md, "Every baseline at the default length").

    python benchmarks/predictor_saturation.py --run RUN_DIR [--run RUN_DIR ...] [--num 256] [--out OUT]

For each run's last checkpoint, on the first ``--num`` test images, the model in training mode (the
mode the predictors decide in: DynamicViT masks, ToFe freezes) with a fixed seed: each predictor's
mean keep probability and mean keep/drop log-odds, in model order. Log-odds far from 0 (|x| >> 10)
mean a predictor that keeps or drops every patch whatever the image: its straight-through gradient
has vanished. Beside them, from the run directory: the learning rate and gradient clip it trained
with, the epochs it finished and its last test top-1 (on the run's own test images), so runs of
different recipes can be read side by side (docs/results.md, "Learned keep predictors collapse").
Writes OUT.json and OUT.md when ``--out`` is given.
"""
from __future__ import annotations

import torch
from assignment_stats import facts_cells, per_run, run_facts

from adaptivision.reduction.importance import KeepScorePredictor


def predictor_stats(model: torch.nn.Module, x: torch.Tensor) -> list:
    """[(mean keep probability, mean keep/drop log-odds)] of each keep-score predictor."""
    outs = []
    hooks = [m.register_forward_hook(lambda mod, i, o: outs.append(o.detach()))   # o: (B, N, 2) log-probs
             for m in model.modules() if isinstance(m, KeepScorePredictor)]
    model.train()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [dict(keep=o[..., 0].exp().mean().item(), log_odds=(o[..., 0] - o[..., 1]).mean().item()) for o in outs]


def _row(r: dict) -> str:
    keep = ", ".join(f"{s['keep']:.3f}" for s in r["predictors"])
    odds = ", ".join(f"{s['log_odds']:+.1f}" for s in r["predictors"])
    return f"| {r['run']} | {facts_cells(r)} | {keep} | {odds} |"


def main(argv=None) -> int:
    return per_run(__doc__, 256, lambda model, x: dict(predictors=predictor_stats(model, x)),
                   "| run | lr | grad clip | epochs | test top-1 (images) | keep probability per predictor "
                   "| keep/drop log-odds per predictor |\n|---|---|---|---|---|---|---|", _row, argv, extra=run_facts)


if __name__ == "__main__":
    raise SystemExit(main())
