"""How unequal the super-tokens' masses are after DTC: the bias proportional attention adds.

With ``prop_attn=True`` every attention logit toward super-token k gains ``log m_k`` (ToMe's
proportional attention), ``m_k = sum_i a_ik`` the soft patch count of its cluster. This reports,
on each run's last checkpoint and its first ``--num`` test images: the masses' 10th, 50th and 90th
percentiles, the spread of ``log m_k`` over an image's super-tokens (the logit bias's std, mean over
images), and the share of the patch mass held by an image's heaviest quarter of super-tokens.

    python benchmarks/mass_stats.py --run experiments/default/runs/<run>/seed0 ... --out OUT
"""
from __future__ import annotations

import torch
from assignment_stats import per_run


@torch.no_grad()
def mass_stats(model, x: torch.Tensor) -> dict:
    out = model.eval().forward_tokens(x)
    P = model.num_prefix_tokens
    m = out.mass[:, P:].float()                                                      # (B, T), 0 on padding
    real = m > 0
    per_image = [mi[ri] for mi, ri in zip(m, real, strict=True)]                                # (K_b,) each
    flat = torch.cat(per_image)
    q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9]))
    log_std = torch.stack([mi.log().std() for mi in per_image]).mean()
    top = torch.stack([mi.sort(descending=True).values[: max(1, len(mi) // 4)].sum() / mi.sum()
                       for mi in per_image]).mean()
    return dict(p10=q[0].item(), p50=q[1].item(), p90=q[2].item(), log_mass_std=log_std.item(),
                top_quarter_share=top.item(), mean_k=sum(len(mi) for mi in per_image) / len(per_image),
                prop_attn=bool(model.prop_attn))


def main(argv=None) -> int:
    return per_run(__doc__, 512, mass_stats,
                   "| run | prop_attn | mass p10 / p50 / p90 | std of log mass | heaviest quarter's share | K |\n"
                   "|---|---|---|---|---|---|",
                   lambda r: f"| {r['run']} | {r['prop_attn']} | {r['p10']:.2f} / {r['p50']:.2f} / {r['p90']:.2f} | "
                             f"{r['log_mass_std']:.2f} | {r['top_quarter_share']:.2f} | {r['mean_k']:.1f} |", argv)


if __name__ == "__main__":
    raise SystemExit(main())
