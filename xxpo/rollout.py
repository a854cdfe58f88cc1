"""Batched sampling with a KV cache, behaviour log-probs, and a staleness buffer.

Every policy-gradient method in the package learns from a :class:`Rollout`: for each prompt, ``G``
responses sampled from the policy, with the log-probability the sampling policy gave each sampled
token (``behav_logp``, the pi_old / pi_behav of the papers) and the policy version that produced it.

Three pieces:

1. :func:`sample` -- a hand-written decoding loop: one prefill forward over the distinct left-padded
   prompts (shared by their G samples), then one single-token forward per step that reuses the
   key/value cache. Temperature, top-p (nucleus, Holtzman et al. 2019, arXiv 1904.09751) and greedy
   decoding; each row stops at its own EOS.
2. :func:`response_logprobs` -- the differentiable forward used in training: a pass over prompt +
   response (the prompt once per group) that recomputes the sampling policy's log-probs (equal to
   ``policy_logp`` to float precision when the weights did not change, because both build position ids
   the same way; ``policy_logp`` is ``behav_logp`` unless ``top_p < 1``, see :func:`sample`).
3. :class:`LaggedPolicy` -- bounded staleness for simulated asynchronous RL (AReaL, arXiv 2505.24298,
   Sec. 4.1): rollouts come from weights up to ``eta`` versions older than the learner's.

Position ids: prompts are LEFT padded, so a row's first real token sits at a different column in each
row. Every forward here uses ``position_ids = cumsum(attention_mask) - 1`` (clamped at 0 on padding;
:func:`xxpo.models.position_ids_from_mask`, the rule the critics use too), so a real token's position
counts real tokens only, whatever the padding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
from transformers import DynamicCache

from xxpo.functional import entropy_from_logits, logprobs_from_hidden, selective_log_softmax
from xxpo.functional.checks import check_choice, check_mask, check_number
from xxpo.models import position_ids_from_mask, replay_routing, routing_decisions


# --------------------------------------------------------------------------------------------------
# The batch of sampled responses
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """``B = n_prompts * G`` sampled responses, laid out group by group (the G samples of prompt 0 first).

    Padding conventions: prompts are LEFT padded, responses RIGHT padded with ``pad_token_id``. On
    padding, ``behav_logp`` and ``policy_logp`` are 0 and ``version`` is -1.

    Two log-probs of each sampled token (they differ only under nucleus sampling, ``top_p < 1``; see
    :func:`sample`): ``behav_logp`` under the distribution the token was actually drawn from (the
    behaviour policy mu of the papers, the denominator of every importance ratio), and ``policy_logp``
    under the untruncated tempered policy softmax(logits / temperature) of the sampling weights (what
    :func:`response_logprobs` recomputes). ``policy_logp`` defaults to ``behav_logp``.
    """

    prompt_ids: torch.Tensor  # (B, P) long, left padded
    prompt_mask: torch.Tensor  # (B, P) long, 1 on real prompt tokens
    response_ids: torch.Tensor  # (B, T) long, right padded
    response_mask: torch.Tensor  # (B, T) float32, 1 on every generated token up to and including EOS
    behav_logp: torch.Tensor  # (B, T) float32, log-prob of the sampled token under the distribution sampled from
    version: torch.Tensor  # (B, T) long, policy version that sampled each token
    prompt_index: torch.Tensor  # (B,) long, which prompt of the batch each row answers
    pad_token_id: int
    policy_logp: torch.Tensor | None = None  # (B, T) float32, log softmax(logits / temperature), untruncated

    def __post_init__(self) -> None:
        if self.policy_logp is None:
            self.policy_logp = self.behav_logp
        b, t = self.response_ids.shape
        for name in ("response_mask", "behav_logp", "policy_logp", "version"):
            if getattr(self, name).shape != (b, t):
                raise ValueError(f"{name} must have shape {(b, t)}, got {tuple(getattr(self, name).shape)}")
        if self.prompt_ids.shape[0] != b or self.prompt_mask.shape != self.prompt_ids.shape:
            raise ValueError(f"prompt_ids and prompt_mask must both have shape ({b}, P)")
        if self.prompt_index.shape != (b,):
            raise ValueError(f"prompt_index must have shape ({b},), got {tuple(self.prompt_index.shape)}")

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # (B, P+T)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1)  # (B, P+T)

    @property
    def nucleus_log_mass(self) -> torch.Tensor:
        """``policy_logp - behav_logp``, ``(B, T)``: log of the nucleus mass Z_t each token was drawn from.

        0 without truncation (``top_p = 1``) and on padding; in ``[log top_p, 0]`` otherwise. It is the
        log of the on-policy ratio pi / mu that a ratio method sees before any update (see :func:`sample`).
        """
        return self.policy_logp - self.behav_logp  # (B, T)

    @property
    def lengths(self) -> torch.Tensor:
        """Number of generated tokens per row, EOS included, ``(B,)`` long."""
        return self.response_mask.sum(-1).long()

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def to(self, device: torch.device | str) -> Rollout:
        return self._map(lambda x: x.to(device))

    def select(self, idx: torch.Tensor | list[int] | slice) -> Rollout:
        """The rows ``idx`` (a minibatch). Keeps the padded width of the whole batch."""
        return self._map(lambda x: x[idx])

    @staticmethod
    def cat(rollouts: list[Rollout]) -> Rollout:
        """Stack rollouts row-wise, re-padding prompts on the left and responses on the right.

        ``prompt_index`` is kept as is (each rollout numbers its own prompts).
        """
        if not rollouts or not all(isinstance(r, Rollout) for r in rollouts):
            raise TypeError("rollouts must be a non-empty list of Rollout")
        pad = rollouts[0].pad_token_id
        if any(r.pad_token_id != pad for r in rollouts):
            raise ValueError("rollouts must all share one pad_token_id")
        p = max(r.prompt_ids.shape[1] for r in rollouts)
        t = max(r.response_ids.shape[1] for r in rollouts)

        def left(x: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(x, (p - x.shape[1], 0), value=value)

        def right(x: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, t - x.shape[1]), value=value)

        return Rollout(
            prompt_ids=torch.cat([left(r.prompt_ids, pad) for r in rollouts]),
            prompt_mask=torch.cat([left(r.prompt_mask, 0) for r in rollouts]),
            response_ids=torch.cat([right(r.response_ids, pad) for r in rollouts]),
            response_mask=torch.cat([right(r.response_mask, 0) for r in rollouts]),
            behav_logp=torch.cat([right(r.behav_logp, 0.0) for r in rollouts]),
            version=torch.cat([right(r.version, -1) for r in rollouts]),
            prompt_index=torch.cat([r.prompt_index for r in rollouts]),
            pad_token_id=pad,
            policy_logp=torch.cat([right(r.policy_logp, 0.0) for r in rollouts]),
        )

    def _map(self, fn) -> Rollout:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Rollout(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def _check_prompts(prompt_ids, prompt_mask) -> None:
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dtype != torch.long or prompt_ids.dim() != 2:
        raise TypeError("prompt_ids must be a (B, P) torch.long tensor")
    check_mask("prompt_mask", prompt_mask, prompt_ids.shape)
    mask = prompt_mask.long()
    if not bool((mask[:, -1] == 1).all()) or not bool((mask.diff(dim=1) >= 0).all()):
        raise ValueError("prompt_mask must be LEFT padded: zeros then ones, with a real last token in every row")


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``; -inf elsewhere."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(-1)  # (B, V)
    mass_before = probs.cumsum(-1) - probs  # (B, V) mass of the strictly more likely tokens
    drop_sorted = mass_before >= top_p  # (B, V) never drops the most likely token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # (B, V) back in vocabulary order
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    num_samples: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    policy_version: int = 0,
    greedy: bool = False,
    logit_noise: float = 0.0,
) -> Rollout:
    """Sample ``num_samples`` responses per prompt with a KV cache; each row stops at its first EOS.

    ``prompt_ids`` / ``prompt_mask``: ``(N, P)`` left padded. Returns a :class:`Rollout` with
    ``B = N * num_samples`` rows, group by group. ``greedy=True`` takes the argmax (for evaluation);
    the generator is then unused. The same ``generator`` state gives the same samples.

    Log-probs under nucleus sampling (``top_p < 1``, Holtzman et al., arXiv 1904.09751). Each token is
    drawn from the truncated, renormalised distribution mu_t(y) = pi_t(y) / Z_t on the nucleus (Z_t =
    its probability mass under pi_t = softmax(logits / temperature), Z_t >= top_p), 0 elsewhere.

    - ``behav_logp`` is log mu_t(y) of the sampled token: the distribution the data really came from,
      so the importance ratios of the objectives (pi_theta / behav, decoupled PPO's and A-3PO's
      behaviour weights) correct for the truncation as for any other behaviour policy. This is the
      choice here, rather than refusing ``top_p < 1`` for ratio methods: the rollout layer cannot know
      the method, the off-policy corrections need the true mu, and ``top_p = 1`` (the default
      everywhere in xxpo) is unaffected.
    - ``policy_logp`` is log pi_t(y), the untruncated policy of the sampling weights, which is what the
      training forward (:func:`response_logprobs`) recomputes. Use it where the policy's own likelihood
      is meant (KL to a reference, SPPO's log pi_t(y|x)).
    - Consequence for ratio methods: before any update, the ratio pi_theta / mu of a token equals
      Z_t (``exp(rollout.nucleus_log_mass)``), not 1. Every ratio starts in ``[top_p, 1]``; with PPO-style
      clipping at ``1 - eps``, tokens with Z_t < 1 - eps and a negative advantage get no gradient from the
      first minibatch on (e.g. ``top_p = 0.7`` with ``eps = 0.2``). Tokens outside the nucleus are never
      sampled, so the truncated tail is still not corrected for (importance sampling needs mu > 0 where
      pi > 0). Log ``masked_mean(rollout.nucleus_log_mass, rollout.response_mask)`` to see the size.

    With ``top_p = 1`` the two are the same tensor. With ``greedy=True`` both are the untruncated
    log pi_t of the argmax (greedy decoding is for evaluation, not for ratios).

    ``logit_noise`` (default 0, off) simulates an inference engine that disagrees with the trainer: at
    every decoding step Gaussian noise of that standard deviation, drawn from ``generator``, is added to
    the tempered logits, the token is drawn from the noisy distribution mu and both log-probs are those of
    mu. A recompute with :func:`response_logprobs` then differs from ``behav_logp`` (the sampler-trainer
    mismatch that ``xxpo.objectives.mismatch_weights`` corrects). Ignored with ``greedy=True``.
    """
    _check_prompts(prompt_ids, prompt_mask)
    for name, value in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id),
                        ("policy_version", policy_version)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    check_number("temperature", temperature, low=0.0, low_inclusive=False)
    check_number("top_p", top_p, low=0.0, high=1.0, low_inclusive=False)
    check_number("logit_noise", logit_noise, low=0.0)
    if not isinstance(greedy, bool):
        raise TypeError(f"greedy must be a bool, got {type(greedy).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    device = next(model.parameters()).device
    if generator is not None and not greedy and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the model samples on {device}: torch.multinomial "
                         f"needs a generator of the model's device, e.g. torch.Generator(device={str(device)!r})")
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device).long()  # (N, P)
    was_training = model.training
    model.eval()
    try:
        # inference_mode skips autograd's bookkeeping (version counters, views); its outputs cannot be
        # saved for a backward pass, so the ids, which the training forward embeds, are cloned out of it
        with torch.inference_mode():
            response_ids, logps, untruncated = _decode(
                model, prompt_ids, prompt_mask, num_samples, max_new_tokens, eos_token_id, pad_token_id,
                temperature, top_p, generator, greedy, logit_noise,
            )
        response_ids = response_ids.clone()  # (B, T) an ordinary tensor
    finally:
        model.train(was_training)
    prompt_ids = prompt_ids.repeat_interleave(num_samples, dim=0)  # (B, P)
    prompt_mask = prompt_mask.repeat_interleave(num_samples, dim=0)  # (B, P)
    prompt_index = torch.arange(prompt_ids.shape[0] // num_samples, device=device).repeat_interleave(num_samples)  # (B,)

    # A token is real if no EOS came strictly before it: 1 up to and including the first EOS.
    is_eos = (response_ids == eos_token_id).long()  # (B, T)
    eos_before = is_eos.cumsum(-1) - is_eos  # (B, T)
    response_mask = (eos_before == 0).float()  # (B, T)
    version = torch.full_like(response_ids, policy_version).masked_fill(response_mask == 0, -1)  # (B, T)
    behav_logp = logps * response_mask  # (B, T)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        behav_logp=behav_logp,
        version=version,
        prompt_index=prompt_index,
        pad_token_id=pad_token_id,
        policy_logp=behav_logp if untruncated is logps else untruncated * response_mask,  # (B, T)
    )


def _decode(
    model, prompt_ids, prompt_mask, num_samples, max_new_tokens, eos_token_id, pad_token_id, temperature, top_p,
    generator, greedy, logit_noise=0.0,
):
    """The decoding loop of :func:`sample`: returns response ids ``(B, T)``, their log-probs under the
    distribution sampled from ``(B, T)`` and under the untruncated tempered policy ``(B, T)`` (the same
    tensor when nothing is truncated).

    The prefill runs once per distinct prompt ``(N, P)``; its key/value cache, last logits, mask and
    positions are then repeated ``num_samples`` times, so the G samples of a prompt share one prefill.
    """
    cache = DynamicCache(config=model.config)
    positions = position_ids_from_mask(prompt_mask)  # (N, P)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache.batch_repeat_interleave(num_samples)  # (B, heads, P, d) per layer
    logits = out.logits[:, -1].repeat_interleave(num_samples, dim=0)  # (B, V)
    attention_mask = prompt_mask.repeat_interleave(num_samples, dim=0)  # (B, P+t), grows by one column per step
    positions = positions.repeat_interleave(num_samples, dim=0)  # (B, P)
    b, p = attention_mask.shape
    next_position = positions[:, -1:] + 1  # (B, 1)
    # Every generated token is real, so step t's mask is the prompt mask followed by t + 1 ones: build the
    # attention kernel's mask for the longest response once and slice it (None: kernel not handled here).
    step_masks = _decoding_masks(model, torch.cat([attention_mask, attention_mask.new_ones(b, max_new_tokens)], 1))

    truncate = top_p < 1.0 and not greedy
    tokens, logps, policy_logps = [], [], []  # policy_logps only under truncation
    finished = torch.zeros(b, dtype=torch.bool, device=prompt_ids.device)  # (B,)
    for step in range(max_new_tokens):
        logits = logits.float() if temperature == 1.0 else logits.float() / temperature  # (B, V)
        if logit_noise and not greedy:  # the sampler's own numerics: mu = softmax(logits / T + noise)
            noise = torch.randn(logits.shape, generator=generator, device=logits.device)  # (B, V)
            logits = logits + logit_noise * noise  # (B, V)
        if greedy:
            token = logits.argmax(-1)  # (B,)
        else:
            filtered = _top_p_filter(logits, top_p) if truncate else logits  # (B, V)
            token = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)
        logp = selective_log_softmax(logits, token)  # (B,) log pi_t(token), untruncated
        # log mu_t(token) = log pi_t(token) - log Z_t under truncation (Z_t = nucleus mass), else log pi_t
        behav = selective_log_softmax(filtered, token) if truncate else logp  # (B,)
        token = token.masked_fill(finished, pad_token_id)
        tokens.append(token)
        logps.append(behav.masked_fill(finished, 0.0))
        if truncate:
            policy_logps.append(logp.masked_fill(finished, 0.0))
        finished = finished | (token == eos_token_id)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if step_masks is not None:
            attention_mask = step_masks[..., : p + step + 1]  # (B, 1, 1, P+t+1)
        else:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(b, 1)], dim=1)  # (B, P+t+1)
        out = model(
            input_ids=token.unsqueeze(-1),
            attention_mask=attention_mask,
            position_ids=next_position,
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]  # (B, V)
        next_position = next_position + 1
    response_ids, behav_logp = torch.stack(tokens, dim=1), torch.stack(logps, dim=1)  # (B, T), (B, T)
    return response_ids, behav_logp, torch.stack(policy_logps, dim=1) if truncate else behav_logp  # (B, T)


def _decoding_masks(model, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The 4D attention mask ``(B, 1, 1, K)`` of a one-token decoding step over ``K`` keys, in the form the
    model's attention kernel takes, for the 2D ``attention_mask`` ``(B, K)``; slicing its last dimension
    gives the mask of every shorter step.

    A single query token attends to every earlier real key, so the causal mask is the key padding mask:
    boolean (True = attend) for ``"sdpa"``, additive (0 or the dtype's minimum) for ``"eager"``, which is
    what ``transformers.masking_utils`` builds for those kernels at every step. Other kernels: ``None``
    (the caller passes the 2D mask and lets ``transformers`` build it).
    """
    kernel = getattr(model.config, "_attn_implementation", None)
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, K)
    if kernel == "sdpa":
        return keep
    if kernel == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return None


def response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask, routing=None) -> torch.Tensor:
    """The logits that predict each response token, ``(B, T, V)`` in the model's dtype (differentiable).

    ``prompt_ids`` / ``prompt_mask`` ``(B, P)`` left padded, ``response_ids`` / ``response_mask`` ``(B, T)``
    right padded (long masks); the inputs are not validated here (:func:`token_logprobs` does).

    The logit that predicts response token j sits at column P-1+j, so the forward reads prompt +
    response up to token T-2 only: the last response token predicts nothing used here and, causally,
    changes no earlier position (one token fewer per row than the full sequence, same logits).

    Rows that share a prompt (the G samples of a group) share its forward: the K distinct prompts run
    once ``(K, P)`` into a key/value cache, the cache is gathered back to the B rows (indexing is
    differentiable, so gradients from every row reach the shared prompt pass), and only the responses
    ``(B, T-1)`` run on top. The prompt pass's last logit predicts response token 0. With no repeated
    prompt this is one ordinary forward over prompt + response. Both give the same log-probs up to
    float rounding.

    ``routing`` (MoE models only): expert choices ``(L, B, P+T, k)`` over prompt + response to replay
    (:func:`xxpo.models.replay_routing`; the last column is dropped with the last token). The
    shared-prompt forward routes ``K * P + B * (T-1)`` tokens, not one per column of the decisions, so
    with ``routing`` the forward is always the plain one-pass forward over prompt + response, run under
    the replay.
    """
    return _response_forward(model, prompt_ids, prompt_mask, response_ids, response_mask, routing, hidden=False)


def response_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask, routing=None) -> torch.Tensor:
    """The final hidden states that predict each response token, ``(B, T, H)`` (differentiable).

    The same forward as :func:`response_logits` (shared prompts, Routing Replay, position ids) through
    the model's backbone (``model.base_model``, whose output is after the last norm) without the LM
    head, so that :func:`xxpo.functional.logprobs_from_hidden` can apply the head one chunk of rows at
    a time. ``response_logits(...) == lm_head(response_hidden(...))`` for the models
    :func:`lm_head_of` accepts.
    """
    return _response_forward(model, prompt_ids, prompt_mask, response_ids, response_mask, routing, hidden=True)


def lm_head_of(model) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight (V, H), bias (V,) or None)`` when ``model``'s logits are exactly ``linear(backbone output)``.

    ``None`` otherwise: no separate backbone, an output layer that is not an ``nn.Linear``, or a config
    that scales or soft-caps the logits (Gemma-2's ``final_logit_softcapping``, Cohere's ``logit_scale``,
    ...); those models keep the full-logits path.
    """
    backbone = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is model or not isinstance(head, torch.nn.Linear):
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return None
    return head.weight, head.bias


def _response_forward(model, prompt_ids, prompt_mask, response_ids, response_mask, routing, hidden: bool) -> torch.Tensor:
    """:func:`response_logits` (``hidden=False``: ``(B, T, V)``) or :func:`response_hidden` (``(B, T, H)``)."""
    p, t = prompt_ids.shape[1], response_ids.shape[1]
    inputs = response_ids[:, :-1]  # (B, T-1) the tokens whose next-token logits are needed
    attention_mask = torch.cat([prompt_mask, response_mask[:, :-1]], dim=1)  # (B, P+T-1)
    position_ids = position_ids_from_mask(attention_mask)  # (B, P+T-1)
    net = model.base_model if hidden else model

    def run(keep: int | None, **kwargs) -> torch.Tensor:
        """One forward; its last ``keep`` columns (all when None) of logits or hidden states."""
        if not hidden:
            return net(**kwargs, **({} if keep is None else {"logits_to_keep": keep})).logits
        states = net(**kwargs).last_hidden_state  # (b, S, H)
        return states if keep is None else states[:, -keep:]

    if routing is not None:
        with replay_routing(model, routing[:, :, :-1]):
            return run(t, input_ids=torch.cat([prompt_ids, inputs], dim=1), attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=False)  # (B, T, V or H)
    distinct, row_prompt = torch.unique(torch.cat([prompt_ids, prompt_mask], dim=1), dim=0, return_inverse=True)
    if distinct.shape[0] == prompt_ids.shape[0]:
        return run(t, input_ids=torch.cat([prompt_ids, inputs], dim=1), attention_mask=attention_mask,
                   position_ids=position_ids, use_cache=False)  # (B, T, V or H): column P-1+j predicts token j
    cache = DynamicCache(config=model.config)
    first = run(1, input_ids=distinct[:, :p], attention_mask=distinct[:, p:],
                position_ids=position_ids_from_mask(distinct[:, p:]), past_key_values=cache,
                use_cache=True)[row_prompt]  # (B, 1, V or H) predicts response token 0
    if t == 1:
        return first
    cache.batch_select_indices(row_prompt)  # (B, heads, P, d) per layer
    out = run(None, input_ids=inputs, attention_mask=attention_mask, position_ids=position_ids[:, p:],
              past_key_values=cache, use_cache=True)  # (B, T-1, V or H)
    return torch.cat([first, out], dim=1)  # (B, T, V or H)


def token_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    routing: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(response token | prefix) under softmax(logits / temperature), ``(B, T)`` float32, 0 on padding.

    A differentiable forward over LEFT-padded prompts ``(B, P)`` followed by RIGHT-padded responses
    ``(B, T)``, with the position ids :func:`sample` uses (see :func:`response_logits` for how rows
    that share a prompt share its forward). With ``with_entropy=True`` also returns the
    entropy of the tempered distribution at each response position, ``(B, T)``. ``routing``: MoE
    expert choices ``(L, B, P+T, k)`` to replay (Routing Replay; see :func:`response_logprobs`).

    Two paths give the same numbers up to float rounding (:func:`uses_chunked_logprobs` picks one):

    - full logits: :func:`response_logits` builds ``(B, T, V)`` logits, then a float32 log-softmax and
      gather (:func:`xxpo.functional.selective_log_softmax`). Every committed record was made this way.
    - chunked: :func:`response_hidden` gives ``(B, T, H)`` hidden states and
      :func:`xxpo.functional.logprobs_from_hidden` applies the LM head, temperature, log-softmax,
      gather and entropy ``chunk`` rows at a time, also in the backward pass, on real tokens only: no
      ``(B, T, V)`` tensor exists. With a real vocabulary (151,936 tokens) this is what makes long
      responses fit.

    ``chunk_rows``: ``None`` (automatic), ``0`` (always full logits) or ``n > 0`` (always chunked,
    ``n`` rows per chunk).
    """
    _check_prompts(prompt_ids, prompt_mask)
    if not isinstance(response_ids, torch.Tensor) or response_ids.dtype != torch.long or response_ids.dim() != 2:
        raise TypeError("response_ids must be a (B, T) torch.long tensor")
    if response_ids.shape[0] != prompt_ids.shape[0]:
        raise ValueError(
            f"response_ids must have {prompt_ids.shape[0]} rows like prompt_ids, got {response_ids.shape[0]}"
        )
    check_mask("response_mask", response_mask, response_ids.shape)
    check_number("temperature", temperature, low=0.0, low_inclusive=False)
    if routing is not None:
        b, seq = prompt_ids.shape[0], prompt_ids.shape[1] + response_ids.shape[1]
        if not isinstance(routing, torch.Tensor) or routing.dim() != 4 or routing.shape[1:3] != (b, seq):
            shape = tuple(routing.shape) if isinstance(routing, torch.Tensor) else type(routing).__name__
            raise ValueError(f"routing must be expert choices of shape (L, B={b}, P+T={seq}, k), got {shape}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 0):
        raise ValueError(f"chunk_rows must be None, 0 or a positive int, got {chunk_rows!r}")
    head = lm_head_of(model) if chunk_rows != 0 else None
    if head is not None and uses_chunked_logprobs(response_ids.numel(), head[0].shape[0], chunk_rows):
        states = response_hidden(model, prompt_ids, prompt_mask.long(), response_ids, response_mask.long(),
                                 routing=routing)  # (B, T, H)
        return logprobs_from_hidden(states, head[0], response_ids, bias=head[1], temperature=temperature,
                                    mask=response_mask, with_entropy=with_entropy, chunk_rows=chunk_rows or None)
    logits = response_logits(model, prompt_ids, prompt_mask.long(), response_ids, response_mask.long(), routing=routing)
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature  # (B, T, V)
    padding = response_mask == 0  # (B, T)
    logp = selective_log_softmax(logits, response_ids).masked_fill(padding, 0.0)  # (B, T)
    if not with_entropy:
        return logp
    return logp, entropy_from_logits(logits).masked_fill(padding, 0.0)  # (B, T), (B, T)


CHUNKED_LOGITS_THRESHOLD = 2**26
"""Automatic rule of :func:`uses_chunked_logprobs`: chunk when ``B * T * V`` exceeds this many logits
(67,108,864, i.e. 256 MB of float32 logits; 442 response tokens at V = 151,936)."""


def uses_chunked_logprobs(rows: int, vocab_size: int, chunk_rows: int | None = None) -> bool:
    """Whether :func:`token_logprobs` takes the chunked path for ``rows = B * T`` positions over ``vocab_size`` tokens.

    ``chunk_rows=None`` (automatic): chunked exactly when ``rows * vocab_size > CHUNKED_LOGITS_THRESHOLD``.
    The suite's tiny models (a vocabulary of a few dozen characters, at most a few thousand response
    positions per batch) stay far below it, so they keep the full-logits path their records were made
    with, bit for bit; a real vocabulary crosses it from a few hundred response tokens. ``0``: never;
    ``n > 0``: always. (A model whose logits are not a plain linear head, :func:`lm_head_of`, never
    chunks.)
    """
    if chunk_rows is None:
        return rows * vocab_size > CHUNKED_LOGITS_THRESHOLD
    return chunk_rows > 0


def response_logprobs(
    model: torch.nn.Module,
    rollout: Rollout,
    temperature: float = 1.0,
    with_entropy: bool = False,
    routing: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logprobs` of a rollout's responses: the training forward of every policy-gradient method.

    On the weights that sampled the rollout this equals ``rollout.policy_logp`` up to float rounding,
    which is ``rollout.behav_logp`` when ``top_p = 1``; under ``top_p < 1`` it exceeds ``behav_logp`` by
    the nucleus log-mass (:func:`sample` says what that means for ratios).

    ``routing`` -- Routing Replay for MoE models (GSPO, arXiv 2507.18071, Sec. 5.3): the expert choices
    ``(L, B, P+T, k)`` of the behaviour policy on this rollout's ``input_ids`` (prompt + response, the
    batch's full padded width), as returned by :meth:`LaggedPolicy.routing` or
    :func:`xxpo.models.routing_decisions`; for a minibatch ``rollout.select(idx)`` pass
    ``decisions[:, idx]``. Every MoE layer then uses those experts, with gate weights from the current
    router (:func:`xxpo.models.replay_routing`), so the ratio against ``behav_logp`` compares the two
    policies under the behaviour policy's routing. The forward is then the plain one-pass forward over
    ``(B, P+T)`` (the shared-prompt forward has another token layout), which costs more on batches with
    repeated prompts. ``None`` (default): the model routes as usual.

    ``chunk_rows``: full logits or log-probs from hidden states in chunks (:func:`token_logprobs`).
    """
    if not isinstance(rollout, Rollout):
        raise TypeError(f"rollout must be a Rollout, got {type(rollout).__name__}")
    return token_logprobs(
        model,
        rollout.prompt_ids,
        rollout.prompt_mask,
        rollout.response_ids,
        rollout.response_mask,
        temperature=temperature,
        with_entropy=with_entropy,
        routing=routing,
        chunk_rows=chunk_rows,
    )


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """The text of each response: its real tokens (up to and including EOS), special tokens dropped."""
    if not isinstance(rollout, Rollout):
        raise TypeError(f"rollout must be a Rollout, got {type(rollout).__name__}")
    ids = rollout.response_ids.tolist()
    lengths = rollout.lengths.tolist()
    return tokenizer.batch_decode([row[:n] for row, n in zip(ids, lengths)], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------
# Bounded staleness
# --------------------------------------------------------------------------------------------------

LAG_MODES = ("max", "uniform")


class LaggedPolicy:
    """An inference copy of the policy that samples with weights up to ``eta`` versions old.

    AReaL (arXiv 2505.24298, Sec. 4.1) lets rollout workers run ahead of the trainer but bounds the
    staleness: data used at step ``s`` was produced by a policy of version ``>= s - eta``. Here that is
    simulated on one machine. After optimizer step ``k`` the trainer calls ``publish(model, k)``; at
    step ``s`` :meth:`sample_model` returns the inference copy holding version ``max(0, s - lag)`` with
    ``lag = eta`` (``mode="max"``, always the oldest allowed) or ``lag ~ Uniform{0..eta}``
    (``mode="uniform"``, drawn from ``generator``): not the latest version unless ``lag = 0``.
    ``eta=0`` is synchronous on-policy sampling. The constructor publishes the initial weights as
    version 0. With ``eta=0`` the live model itself samples (no weight copies).
    :meth:`routing` gives the sampling weights' MoE expert choices on a rollout (Routing Replay).
    """

    def __init__(self, model: torch.nn.Module, eta: int, mode: str = "max", generator: torch.Generator | None = None):
        if isinstance(eta, bool) or not isinstance(eta, int) or eta < 0:
            raise ValueError(f"eta must be an int >= 0, got {eta!r}")
        check_choice("mode", mode, LAG_MODES)
        self.eta = eta
        self.mode = mode
        self.generator = generator
        # eta = 0 samples from the live model itself: no copy, no snapshots (their values are None).
        self.inference_model = copy.deepcopy(model).eval().requires_grad_(False) if eta > 0 else model
        self.snapshots: dict[int, dict[str, torch.Tensor] | None] = {}
        self.loaded_version: int | None = None
        self.publish(model, 0)

    @property
    def latest_version(self) -> int:
        return max(self.snapshots)

    def publish(self, model: torch.nn.Module, version: int) -> None:
        """Record ``model``'s current weights as ``version``; keep only the last ``eta + 1`` versions."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        if self.snapshots and version <= self.latest_version:
            raise ValueError(f"version must increase: got {version} after {self.latest_version}")
        if self.eta == 0:
            self.inference_model, self.snapshots[version] = model, None
        else:
            self.snapshots[version] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for old in sorted(self.snapshots)[: -(self.eta + 1)]:
            del self.snapshots[old]

    def sample_model(self, step: int) -> tuple[torch.nn.Module, int]:
        """``(inference model, version)`` to sample with at training step ``step``.

        The version is ``max(0, step - lag)`` with ``lag = eta`` (``mode="max"``) or ``lag`` drawn
        uniformly from ``0..eta`` (``mode="uniform"``), so the latest published version only when
        ``lag`` is 0 (always at ``eta=0``, where the model returned is the live model itself).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if step > self.latest_version:
            raise ValueError(f"step {step} is ahead of the latest published version {self.latest_version}")
        lag = self.eta
        if self.mode == "uniform":
            lag = int(torch.randint(0, self.eta + 1, (1,), generator=self.generator))
        version = max(0, step - lag)
        return self._load(version), version

    def _load(self, version: int) -> torch.nn.Module:
        """The inference model holding ``version``'s weights (loads the snapshot if another is loaded)."""
        if version not in self.snapshots:
            raise ValueError(
                f"version {version} is no longer kept (kept: {sorted(self.snapshots)}); publish every step"
            )
        if self.eta > 0 and version != self.loaded_version:
            self.inference_model.load_state_dict(self.snapshots[version])
            self.loaded_version = version
        return self.inference_model

    def sample(self, step: int, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **kwargs) -> Rollout:
        """:func:`sample` with the weights :meth:`sample_model` picks; ``Rollout.version`` records them."""
        if "policy_version" in kwargs:
            raise TypeError("policy_version is set by LaggedPolicy.sample; do not pass it")
        model, version = self.sample_model(step)
        return sample(model, prompt_ids, prompt_mask, policy_version=version, **kwargs)

    @torch.no_grad()
    def routing(self, rollout: Rollout) -> torch.Tensor:
        """Routing Replay's cache: the experts the policy that SAMPLED each row routes its tokens to.

        Returns long ``(L, B, P+T, k)`` over ``rollout.input_ids`` (prompt + response, full padded width),
        the ``routing=`` argument of :func:`response_logprobs`. Each row is routed by the weights of its
        own ``rollout.version`` (a rollout built with :meth:`Rollout.cat` may mix versions), with one
        plain forward per version (:func:`xxpo.models.routing_decisions`), the way the GSPO paper caches
        the old policy's routing of the rollout. Under staleness (``eta > 0``) those are the snapshot's
        weights, not the learner's.

        Call it right after :meth:`sample`, before the next optimizer step: with ``eta = 0`` no copy is
        kept, the live model is the sampling model only until it is updated, and only the latest
        published version is available. Raises ``ValueError`` for a version that is no longer kept and
        for a dense model.
        """
        if not isinstance(rollout, Rollout):
            raise TypeError(f"rollout must be a Rollout, got {type(rollout).__name__}")
        row_version = rollout.version[:, 0]  # (B,) every row has a real first token, so its version
        versions = sorted(set(row_version.tolist()))
        if self.eta == 0 and versions != [self.latest_version]:
            raise ValueError(
                f"with eta=0 only the live model (version {self.latest_version}) is kept; the rollout has versions "
                f"{versions}: compute the routing right after sampling"
            )
        input_ids, attention_mask = rollout.input_ids, rollout.attention_mask  # (B, P+T)
        decisions = None
        for version in versions:
            rows = (row_version == version).nonzero().squeeze(-1)  # (b,)
            part = routing_decisions(self._load(version), input_ids[rows], attention_mask[rows])  # (L, b, P+T, k)
            if decisions is None:
                decisions = part.new_empty((part.shape[0], len(rollout), *part.shape[2:]))
            decisions[:, rows] = part
        return decisions  # (L, B, P+T, k)
