"""Train with any xxpo policy objective inside TRL's ``GRPOTrainer`` (TRL 1.16).

TRL has no loss registry: a subclass overrides ``_compute_loss(model, inputs)``. ``XxpoGRPOTrainer`` does,
and everything else stays TRL's (generation, rewards, group advantages, reference model, logging)::

    from trl import GRPOConfig
    from xxpo.integrations.trl import XxpoGRPOTrainer

    trainer = XxpoGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(..., epsilon=3e-4, epsilon_high=4e-4,
                              steps_per_generation=4), train_dataset=dataset, processing_class=tokenizer,
                              objective="gspo")
    trainer.train()

Where the objective's arguments come from:

- ``GRPOConfig`` fields that name the same quantity set it: ``epsilon`` -> ``clip_eps_low``, ``epsilon_high``
  -> ``clip_eps_high`` (None: = epsilon), ``sapo_temperature_pos/neg`` -> ``tau_pos/neg``, ``beta`` ->
  ``kl_coef`` (with TRL's reference log-probs as ``ref_logp``), ``max_completion_length`` -> ``norm_len``
  when the aggregation is ``seq-mean-token-sum-norm``. Only for objectives that take the argument.
- ``objective_kwargs`` gives everything else under xxpo's names (``loss_agg_mode``, ``dual_clip_c``,
  ``kl_estimator``, ``behav_weight_cap``, ...). Naming one of the arguments above there is an error that
  names the config field to set instead, so no value is ever set twice.
- ``loss_type`` and ``importance_sampling_level`` are not read: the objective is the loss (for GSPO's
  sequence ratio use ``objective="gspo"``; a non-token level is refused).

Old and proximal log-probs. TRL recomputes ``old_per_token_logps`` with the training weights when a batch
is reused across optimizer steps, and omits them when it is not (then the batch is on-policy and
``old_logp = logp.detach()``, as in TRL). Decoupled PPO takes those as pi_prox: the policy before the
updates on this batch, AReaL's recompute. Its behaviour policy is the sampler: vLLM's
``sampling_per_token_logps`` when TRL has them, otherwise the same weights that pi_prox used (weight 1).
A-3PO is refused: every TRL sample has staleness 0.

Gradient accumulation (``GRPOTrainer.loss_is_scaled_for_ga``: the subclass scales). The objective's loss on
one micro-batch is multiplied by ``xxpo.integrations.global_scale``: ``token-mean`` is renormalized by the
tokens of the whole accumulation window (TRL's ``num_items_in_batch``, as its ``dapo`` loss does), so
accumulation gives the loss of the whole window exactly; the response-averaged modes divide by the number
of accumulation steps, exact when every micro-batch has as many non-empty responses (TRL's fixed batch
size; ``mask_truncated_completions`` can empty some).

TRL features the objectives do not apply are refused at construction rather than ignored:
``top_entropy_quantile < 1``, ``off_policy_mask_threshold``, ``delta``, an entropy bonus, vLLM's importance
sampling correction (use ``objective="decoupled_ppo"`` with it off), and ``use_bias_correction_kl`` with
``beta > 0`` (xxpo's KL term is the plain estimator named by ``kl_estimator``).
"""

from __future__ import annotations

import torch
from trl import GRPOTrainer

from xxpo.integrations import (
    SEQUENCE_ADVANTAGES,
    TRL_REFUSED,
    aggregation,
    calling_form,
    check_objective_kwargs,
    global_scale,
    keyword_parameters,
    sequence_advantages,
)
from xxpo.objectives import get

CONFIG_ARGUMENTS = {
    "clip_eps_low": "GRPOConfig.epsilon",
    "clip_eps_high": "GRPOConfig.epsilon_high",
    "tau_pos": "GRPOConfig.sapo_temperature_pos",
    "tau_neg": "GRPOConfig.sapo_temperature_neg",
    "kl_coef": "GRPOConfig.beta",
}
"""Objective arguments that ``GRPOConfig`` sets, and the field that sets each."""

FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
"""Batch entries that ``GRPOTrainer._compute_loss`` passes on to the forward pass (multimodal models)."""


def unsupported_settings(args, beta: float) -> list[str]:
    """The ``GRPOConfig`` settings that would change TRL's loss in ways an xxpo objective does not reproduce."""
    problems = []
    if getattr(args, "importance_sampling_level", "token") != "token":
        problems.append("importance_sampling_level must be 'token' (use objective='gspo' for GSPO's sequence ratio)")
    if getattr(args, "top_entropy_quantile", 1.0) < 1.0:
        problems.append("top_entropy_quantile < 1 (the entropy mask) is not applied by xxpo objectives")
    if getattr(args, "off_policy_mask_threshold", None) is not None:
        problems.append("off_policy_mask_threshold (off-policy sequence masking) is not applied by xxpo objectives")
    if getattr(args, "delta", None) is not None:
        problems.append("delta (two-sided clipping) is not applied by xxpo objectives")
    if getattr(args, "entropy_coef", 0.0) != 0.0 or getattr(args, "use_adaptive_entropy", False):
        problems.append("the entropy bonus (entropy_coef, use_adaptive_entropy) is not applied by xxpo objectives")
    if getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False):
        problems.append("vllm_importance_sampling_correction must be False: xxpo objectives take no per-token IS "
                        "weights (objective='decoupled_ppo' weights by pi_prox/pi_behav from vLLM's log-probs)")
    if beta != 0.0 and getattr(args, "use_bias_correction_kl", False):
        problems.append("use_bias_correction_kl must be False with beta > 0: xxpo's KL term is the estimator named by "
                        "kl_estimator, without the ratio weight")
    return problems


class XxpoGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is the xxpo objective ``objective`` (see the module docstring).

    ``objective``: a name of ``xxpo.integrations.POLICY_OBJECTIVES`` except ``a3po``.
    ``objective_kwargs``: further keyword arguments of that objective, under xxpo's names.
    The objective's metrics are logged as ``xxpo/<metric>``.
    """

    def __init__(self, *args, objective: str, objective_kwargs: dict | None = None, **kwargs):
        form = calling_form(objective)
        if objective in TRL_REFUSED:
            raise ValueError(f"objective={objective!r} is not supported in TRL: {TRL_REFUSED[objective]}")
        self.objective_name = objective
        self.objective_form = form
        self.objective_fn = get(objective)
        self.objective_kwargs = check_objective_kwargs(objective, objective_kwargs, CONFIG_ARGUMENTS)
        self.objective_mode = aggregation(objective, self.objective_kwargs)
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:  # refuse before TRL loads the models
            self._check_config(config)
        super().__init__(*args, **kwargs)
        self._check_config(self.args)

    def _check_config(self, config) -> None:
        beta = getattr(config, "beta", 0.0)
        problems = unsupported_settings(config, beta)
        if beta != 0.0 and "kl_coef" not in keyword_parameters(self.objective_name):
            problems.append(f"beta must be 0.0: {self.objective_name} has no KL term")
        if problems:
            raise ValueError(f"XxpoGRPOTrainer(objective={self.objective_name!r}): " + "; ".join(problems))

    def objective_arguments(self) -> dict:
        """Keyword arguments of the objective: config-derived ones, then ``objective_kwargs``."""
        accepted = keyword_parameters(self.objective_name)
        kw = {}
        if "clip_eps_low" in accepted:
            kw["clip_eps_low"] = self.epsilon_low
        if "clip_eps_high" in accepted:
            kw["clip_eps_high"] = self.epsilon_high
        if "tau_pos" in accepted:
            kw["tau_pos"] = self.args.sapo_temperature_pos
            kw["tau_neg"] = self.args.sapo_temperature_neg
        if "kl_coef" in accepted:
            kw["kl_coef"] = self.beta
        if self.objective_mode == "seq-mean-token-sum-norm" and "norm_len" not in self.objective_kwargs:
            kw["norm_len"] = self.max_completion_length
        kw.update(self.objective_kwargs)
        return kw

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + T)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]  # (B, T)
        logp, _, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in FORWARD_KEYS},
        )  # (B, T)
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old  # (B, T): on-policy when TRL did not recompute them
        advantages = inputs["advantages"]  # (B,) from GRPOTrainer; (B, T) from subclasses
        if self.objective_name in SEQUENCE_ADVANTAGES:
            advantages = sequence_advantages(advantages, mask)
        kw = self.objective_arguments()
        if self.beta != 0.0:
            kw["ref_logp"] = inputs["ref_per_token_logps"]

        if self.objective_form == "standard":
            out = self.objective_fn(logp, old, advantages, mask, **kw)
        else:  # decoupled: pi_prox = TRL's old log-probs, pi_behav = the sampler's
            behav = inputs.get("sampling_per_token_logps")
            behav = old if behav is None else torch.where(mask.bool(), torch.nan_to_num(behav, nan=0.0), old)
            out = self.objective_fn(logp, behav, old, advantages, mask, **kw)

        mode = "train" if self.model.training else "eval"
        steps = self.current_gradient_accumulation_steps if mode == "train" else 1
        if self.objective_mode == "token-mean" and mode == "train":
            window_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            window_tokens = window_tokens * steps / self.args.steps_per_generation
            scale = global_scale("token-mean", mask, tokens=float(window_tokens))
        else:
            scale = 1.0 / steps
        loss = out.loss * scale

        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        for key, value in out.metrics.items():
            self._metrics[mode][f"xxpo/{key}"].append(self.accelerator.gather(value.reshape(1)).mean().item())
        return loss


__all__ = ["CONFIG_ARGUMENTS", "XxpoGRPOTrainer", "unsupported_settings"]
