"""Every XXPO objective as a pure function of tensors: one file per method.

Sign convention: papers *maximize* an objective J; every function here returns a loss L = -J to
*minimize*, in a ``LossOutput(loss, metrics)``. Tensors are (B, T) over response tokens, B = prompts x G;
``mask`` marks real tokens; advantages are (B,) per sequence or (B, T) per token.

``get(name)`` looks a method up by name; ``METHODS`` lists the names. ``mismatch_weights`` is not a method:
it returns importance weights for the sampler-trainer mismatch (TIS, MIS, IcePop) usable with any of them.
"""

from xxpo.objectives.a3po import a3po_loss, a3po_prox_logp
from xxpo.objectives.cispo import cispo_loss
from xxpo.objectives.dapo import dapo_loss, overlong_penalty
from xxpo.objectives.decoupled_ppo import decoupled_ppo_loss
from xxpo.objectives.dpo import dpo_loss
from xxpo.objectives.dr_grpo import dr_grpo_loss
from xxpo.objectives.gmpo import gmpo_loss
from xxpo.objectives.grpo import grpo_loss
from xxpo.objectives.gspo import gspo_loss, gspo_token_loss
from xxpo.objectives.mismatch import MISMATCH_LEVELS, MISMATCH_MODES, MismatchWeights, mismatch_weights
from xxpo.objectives.output import LossOutput
from xxpo.objectives.ppo import ppo_loss, value_loss
from xxpo.objectives.sapo import sapo_loss
from xxpo.objectives.sppo_selfplay import sppo_selfplay_loss
from xxpo.objectives.sppo_seq import sequence_value_loss, sppo_seq_loss
from xxpo.objectives.trpo import trpo_step

_REGISTRY = {
    "ppo": ppo_loss,
    "trpo": trpo_step,
    "grpo": grpo_loss,
    "dr_grpo": dr_grpo_loss,
    "dapo": dapo_loss,
    "gspo": gspo_loss,
    "gspo_token": gspo_token_loss,
    "sapo": sapo_loss,
    "decoupled_ppo": decoupled_ppo_loss,
    "a3po": a3po_loss,
    "dpo": dpo_loss,
    "sppo_selfplay": sppo_selfplay_loss,
    "sppo_seq": sppo_seq_loss,
    "cispo": cispo_loss,
    "gmpo": gmpo_loss,
    "rloo": ppo_loss,  # RLOO and REINFORCE++ change the advantage estimator (xxpo.functional), not the loss
    "reinforce_pp": ppo_loss,
}
METHODS = tuple(_REGISTRY)


def get(name: str):
    """The objective function registered under method ``name`` (see ``METHODS``)."""
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {METHODS}, got {name!r}")
    return _REGISTRY[name]


__all__ = [
    "LossOutput",
    "METHODS",
    "MISMATCH_LEVELS",
    "MISMATCH_MODES",
    "MismatchWeights",
    "a3po_loss",
    "a3po_prox_logp",
    "cispo_loss",
    "dapo_loss",
    "decoupled_ppo_loss",
    "dpo_loss",
    "dr_grpo_loss",
    "get",
    "gmpo_loss",
    "grpo_loss",
    "gspo_loss",
    "gspo_token_loss",
    "mismatch_weights",
    "overlong_penalty",
    "ppo_loss",
    "sapo_loss",
    "sequence_value_loss",
    "sppo_selfplay_loss",
    "sppo_seq_loss",
    "trpo_step",
    "value_loss",
]
