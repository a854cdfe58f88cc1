"""SPPO (self-play): Self-Play Preference Optimization (Wu et al. 2024, arXiv 2405.00675).

Not to be confused with sequence-level PPO (``sppo_seq.py``), a different paper with the same acronym.

Alignment as a two-player constant-sum game under a general preference P(y > y' | x): the multiplicative
weights update pi_{t+1}(y|x) ∝ pi_t(y|x) exp(eta P(y > pi_t | x)) converges to the Nash equilibrium.
Taking log Z ≈ eta/2, each iteration regresses the log-ratio onto the centred win rate (Eq. 4.4):

    L = E_{y ~ pi_t}[ ( log pi_theta(y|x)/pi_t(y|x) - eta (P(y > pi_t | x) - 1/2) )^2 ],

with P(y > pi_t | x) estimated by the mean preference of y over K samples of pi_t. The reference pi_t is
the *previous iterate*, refreshed every iteration.

Deviations: none; the default eta = 1000 is the authors' beta = 0.001 (eta = 1/beta). The official code
applies the loss to the best and worst of K samples; that is the caller's choice of rows.
"""

from __future__ import annotations

import torch

from xxpo.functional.checks import check_number, check_same_shape, check_tensor
from xxpo.objectives.output import LossOutput, detached


def sppo_selfplay_loss(
    logp_seq: torch.Tensor,
    ref_logp_seq: torch.Tensor,
    win_prob: torch.Tensor,
    *,
    eta: float = 1000.0,
) -> LossOutput:
    """SPPO's squared loss (Eq. 4.4) from sequence log-probs (B,) and win probabilities (B,) in [0, 1].

    Metrics: log_ratio_mean, target_mean (eta (P - 1/2)), win_prob_mean.
    """
    check_tensor("logp_seq", logp_seq, ndim=1)
    check_tensor("ref_logp_seq", ref_logp_seq, ndim=1)
    check_tensor("win_prob", win_prob, ndim=1)
    check_same_shape("logp_seq", logp_seq, ref_logp_seq=ref_logp_seq, win_prob=win_prob)
    if bool(((win_prob < 0) | (win_prob > 1)).any()):
        raise ValueError("win_prob must lie in [0, 1]")
    check_number("eta", eta, low=0, low_inclusive=False)
    log_ratio = logp_seq - ref_logp_seq.detach()  # (B,)
    target = eta * (win_prob.detach() - 0.5)  # (B,)
    loss = ((log_ratio - target) ** 2).mean()
    return LossOutput(loss, detached(log_ratio_mean=log_ratio.mean(), target_mean=target.mean(), win_prob_mean=win_prob.mean()))
