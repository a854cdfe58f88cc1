"""DPO: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290), and IPO.

The KL-regularized RL problem max E[r] - beta KL(pi || pi_ref) has the closed-form optimum
pi* = pi_ref exp(r / beta) / Z, so r = beta log(pi*/pi_ref) + beta log Z. Substituting this implicit
reward into the Bradley-Terry likelihood of a preference pair cancels Z and leaves a logistic loss on
the policy itself, with no reward model and no sampling (Eq. 7):

    L_DPO = -E[ log sigmoid( beta h ) ],   h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l).

``variant="ipo"`` is IPO (Azar et al. 2023, arXiv 2310.12036 Eq. 17): (h - 1/(2 beta))^2, which
regresses the margin to a finite target instead of pushing it to infinity; ``label_smoothing`` eps is
conservative DPO (cDPO): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).

Deviations: none. ``dpo_beta`` is DPO's temperature, unrelated to GRPO's ``kl_coef``. TRL's IPO divides
each log-ratio by the response length first; pass length-averaged log-probs to get that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xxpo.functional.checks import check_choice, check_number, check_same_shape, check_tensor
from xxpo.objectives.output import LossOutput, detached

DPO_VARIANTS = ("sigmoid", "ipo")


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    *,
    dpo_beta: float = 0.1,
    variant: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO / IPO loss from sequence log-probs, each (B,); the reference ones are detached.

    Metrics: reward_chosen, reward_rejected (mean beta * log-ratio), reward_margin, reward_accuracy
    (fraction of pairs whose implicit reward ranks the chosen response first).
    """
    for name, x in (("chosen_logp", chosen_logp), ("rejected_logp", rejected_logp),
                    ("ref_chosen_logp", ref_chosen_logp), ("ref_rejected_logp", ref_rejected_logp)):
        check_tensor(name, x, ndim=1)
    check_same_shape("chosen_logp", chosen_logp, rejected_logp=rejected_logp,
                     ref_chosen_logp=ref_chosen_logp, ref_rejected_logp=ref_rejected_logp)
    check_number("dpo_beta", dpo_beta, low=0, low_inclusive=False)
    check_choice("variant", variant, DPO_VARIANTS)
    check_number("label_smoothing", label_smoothing, low=0, high=0.5, high_inclusive=False)
    chosen_ratio = chosen_logp - ref_chosen_logp.detach()  # (B,)
    rejected_ratio = rejected_logp - ref_rejected_logp.detach()  # (B,)
    h = chosen_ratio - rejected_ratio  # (B,)
    if variant == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(dpo_beta * h) - label_smoothing * F.logsigmoid(-dpo_beta * h)
    else:
        losses = (h - 1.0 / (2.0 * dpo_beta)) ** 2
    reward_chosen, reward_rejected = dpo_beta * chosen_ratio, dpo_beta * rejected_ratio
    metrics = detached(
        reward_chosen=reward_chosen.mean(),
        reward_rejected=reward_rejected.mean(),
        reward_margin=(reward_chosen - reward_rejected).mean(),
        reward_accuracy=(reward_chosen > reward_rejected).float().mean(),
    )
    return LossOutput(losses.mean(), metrics)
