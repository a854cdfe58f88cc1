"""Shared tensor math under every objective: log-probs, masked aggregation, ratios, advantages, KL."""

from xxpo.functional.advantages import (
    ADV_NORMS,
    batch_whiten,
    gae,
    group_advantages,
    leave_one_out_advantages,
    reinforce_pp_advantages,
    sequence_value_advantages,
    token_rewards_from_outcome,
)
from xxpo.functional.aggregation import LOSS_AGG_MODES, aggregate, masked_mean, masked_sum
from xxpo.functional.kl import KL_ESTIMATORS, is_corrected_k3, kl_penalty
from xxpo.functional.logprobs import (
    entropy_from_logits,
    fisher_product_from_hidden,
    kl_from_hidden,
    logprobs_from_hidden,
    selective_log_softmax,
)
from xxpo.functional.ratios import LOG_RATIO_CLAMP, sequence_log_ratio, token_log_ratio

__all__ = [
    "ADV_NORMS",
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "LOSS_AGG_MODES",
    "aggregate",
    "batch_whiten",
    "entropy_from_logits",
    "fisher_product_from_hidden",
    "gae",
    "group_advantages",
    "is_corrected_k3",
    "kl_from_hidden",
    "kl_penalty",
    "leave_one_out_advantages",
    "logprobs_from_hidden",
    "masked_mean",
    "masked_sum",
    "reinforce_pp_advantages",
    "selective_log_softmax",
    "sequence_log_ratio",
    "sequence_value_advantages",
    "token_log_ratio",
    "token_rewards_from_outcome",
]
