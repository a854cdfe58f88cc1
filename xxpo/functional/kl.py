"""Sampled estimators of KL(pi_theta || pi_ref) (Schulman, "Approximating KL Divergence", 2020).

Tokens are sampled from pi_theta (the policy), so with ``log rho = log pi_ref - log pi_theta``:

====  ==========================  ============================================================
name  per-token value             expected gradient when the value is put in the *loss*
====  ==========================  ============================================================
k1    ``-log rho``                0: E[grad log pi_theta] = 0, so k1 in the loss does nothing on
                                  average (put it in the reward instead, as PPO-RLHF does)
k2    ``0.5 (log rho)^2``         grad KL(pi_theta || pi_ref): the reverse KL, the one we mean
k3    ``rho - 1 - log rho``       grad KL(pi_ref || pi_theta): the *forward* KL (GRPO's choice)
====  ==========================  ============================================================

k1 and k3 are unbiased estimates of the KL value, k2 is biased but never negative; k3 is also
never negative (log x <= x - 1). With off-policy samples from pi_old, ``is_corrected_k3`` weights
k3 by pi_theta / pi_old, whose expected gradient is the reverse-KL gradient (DeepSeek-V3.2; TRL
``use_bias_correction_kl``).
"""

from __future__ import annotations

import torch

from xxpo.functional.checks import check_choice, check_same_shape
from xxpo.functional.ratios import LOG_RATIO_CLAMP

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate, shape of ``logp`` (B, T). ``ref_logp`` is detached (a frozen model)."""
    check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    check_same_shape("logp", logp, ref_logp=ref_logp)
    log_rho = (ref_logp.detach() - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    if estimator == "k1":
        return -log_rho
    if estimator == "k2":
        return 0.5 * log_rho**2
    return torch.expm1(log_rho) - log_rho  # expm1: no cancellation, never negative


def is_corrected_k3(logp: torch.Tensor, ref_logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """(pi_theta / pi_old) * k3 per token: an unbiased reverse-KL gradient from off-policy samples.

    The ratio keeps its gradient; only ``old_logp`` and ``ref_logp`` are constants. (B, T).
    """
    check_same_shape("logp", logp, old_logp=old_logp)
    ratio = torch.exp((logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return ratio * kl_penalty(logp, ref_logp, "k3")
