"""xxpo.integrations.verl: every xxpo_<name> loss, called through verl 0.9.1's own registry and call site.

Each loss is fetched with verl's ``get_policy_loss_fn`` and compared, value and gradient, with
``xxpo.objectives`` called directly and with verl's built-in loss where verl has the method
(``xxpo.integrations.VERL_EQUIVALENTS``). verl's normalization over a global batch
(``global_batch_info``) and the traps of its interface are each checked.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

verl = pytest.importorskip(
    "verl", reason="verl is not installed; `make test` installs it (pip install --no-deps verl==0.9.1 and the "
                   "[verl] extra)")
from omegaconf import OmegaConf  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, agg_loss, get_policy_loss_fn  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

import xxpo.integrations.verl as V  # noqa: E402
import xxpo.objectives as O  # noqa: E402
from xxpo.functional import LOSS_AGG_MODES  # noqa: E402
from xxpo.integrations import FIXED_AGGREGATION, GENERATION_BUDGET, POLICY_OBJECTIVES, VERL_EQUIVALENTS, calling_form  # noqa: E402
from value_grad import value_and_grad  # noqa: E402

B, T = 6, 7
SEQUENCE_LEVEL = ("gspo", "gspo_token")


def test_verl_version():
    assert verl.__version__ == "0.9.1"


def actor(**fields) -> ActorConfig:
    loss_mode = fields.pop("loss_mode", "vanilla")
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                       policy_loss=PolicyLossConfig(loss_mode=loss_mode), **fields)


def batch(seed, *, spread=0.35, empty_row=False, dtype=torch.float64):
    """verl's tensors: (B, T) log-probs, per-token advantages (the sequence value on valid tokens), bool mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1
    mask = torch.arange(T)[None] < lengths[:, None]  # (B, T) bool
    if empty_row:
        mask[2] = False
    old = (-0.2 - 2 * torch.rand(B, T, generator=g, dtype=dtype))
    logp = (old + spread * torch.randn(B, T, generator=g, dtype=dtype)).requires_grad_()
    seq_adv = torch.randn(B, generator=g, dtype=dtype)
    seq_adv[0], seq_adv[3] = abs(seq_adv[0]) + 0.2, -abs(seq_adv[3]) - 0.2
    adv = seq_adv[:, None] * mask  # (B, T): verl's GRPO estimator broadcasts the score over the response
    return logp, old, adv, mask, seq_adv



def same(a, b, rtol=1e-10, atol=1e-13):
    return torch.allclose(a, b, rtol=rtol, atol=atol)


def spread_for(name):
    return 2e-3 if name in SEQUENCE_LEVEL else 0.35


def clip_fields(name):
    return {"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4} if name in SEQUENCE_LEVEL else {}


def agg_fields(name):
    fixed = {"gspo_token": "seq-mean-token-mean", **FIXED_AGGREGATION}  # gspo_token: verl's gspo mode is token-level
    fields = {"loss_agg_mode": fixed.get(name, "token-mean")}
    if name == "dr_grpo":
        fields["loss_scale_factor"] = T
    return fields


# --------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------


def test_every_policy_objective_is_registered():
    assert V.REGISTERED == tuple(f"xxpo_{n}" for n in POLICY_OBJECTIVES)
    for name in V.REGISTERED:
        assert get_policy_loss_fn(name) is POLICY_LOSS_REGISTRY[name]
    assert not any(f"xxpo_{n}" in POLICY_LOSS_REGISTRY for n in ("trpo", "dpo", "sppo_selfplay"))


@pytest.mark.slow
def test_external_module_variable_loads_the_losses():
    """verl imports the modules named in VERL_USE_EXTERNAL_MODULES when verl itself is imported."""
    code = ("import verl; from verl.trainer.ppo.core_algos import get_policy_loss_fn; "
            "print(get_policy_loss_fn('xxpo_gspo').__name__)")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="xxpo.integrations.verl", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "xxpo_gspo"
    env.pop("VERL_USE_EXTERNAL_MODULES")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode != 0 and "Unsupported loss mode: xxpo_gspo" in out.stderr


# --------------------------------------------------------------------------------------------------
# xxpo_<name> computes the objective
# --------------------------------------------------------------------------------------------------


def direct(name, logp, old, adv, seq_adv, mask, cfg, weights=None, staleness=None):
    """xxpo.objectives with the arguments verl's config names (clip ranges, dual clip, temperatures, ...)."""
    fn = O.get(name)
    kw = {}
    params = V.keyword_parameters(name)
    if "clip_eps_low" in params:
        kw.update(clip_eps_low=cfg.clip_ratio_low, clip_eps_high=cfg.clip_ratio_high)
    if "dual_clip_c" in params:
        kw["dual_clip_c"] = cfg.clip_ratio_c
    if "tau_pos" in params:
        kw.update(tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg)
    if "loss_agg_mode" in params:
        kw["loss_agg_mode"] = cfg.loss_agg_mode
    if cfg.loss_agg_mode == "seq-mean-token-sum-norm":
        kw["norm_len"] = cfg.loss_scale_factor
    a = seq_adv if name in V.SEQUENCE_ADVANTAGES else adv
    form = calling_form(name)
    if form == "decoupled":
        return fn(logp, old - weights.log(), old, a, mask, **kw).loss
    if form == "staleness":
        return fn(logp, old, a, mask, staleness, **kw).loss
    return fn(logp, old, a, mask, **kw).loss


@pytest.mark.parametrize("name", POLICY_OBJECTIVES)
def test_verl_registry_loss_equals_the_objective(name):
    logp, old, adv, mask, seq_adv = batch(1, spread=spread_for(name))
    cfg = actor(**clip_fields(name), **agg_fields(name))
    weights = staleness = None
    fn = get_policy_loss_fn(f"xxpo_{name}")
    if calling_form(name) == "decoupled":
        weights = torch.exp(0.3 * torch.randn(B, T, generator=torch.Generator().manual_seed(5), dtype=old.dtype))
    if calling_form(name) == "staleness":
        staleness = 3
        fn = V.make_policy_loss(name, staleness=staleness)
    got_v, got_g = value_and_grad(logp, lambda: fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                                               loss_agg_mode=cfg.loss_agg_mode, config=cfg,
                                               rollout_is_weights=weights))
    want_v, want_g = value_and_grad(logp, lambda: direct(name, logp, old, adv, seq_adv, mask, cfg, weights, staleness))
    assert same(got_v, want_v) and same(got_g, want_g), (name, got_v, want_v)
    assert want_g.abs().sum() > 0


@pytest.mark.parametrize("name", [n for n in POLICY_OBJECTIVES if "loss_agg_mode" in V.keyword_parameters(n)])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_loss_agg_mode_is_honoured(name, mode):
    logp, old, adv, mask, seq_adv = batch(2, spread=spread_for(name))
    cfg = actor(loss_agg_mode=mode, loss_scale_factor=T if mode == "seq-mean-token-sum-norm" else None)
    kw = {"staleness": 2} if calling_form(name) == "staleness" else {}
    fn = V.make_policy_loss(name, **kw)
    weights = torch.full((B, T), 1.5, dtype=old.dtype) if calling_form(name) == "decoupled" else None
    got_v, got_g = value_and_grad(logp, lambda: fn(old, logp, adv, mask, mode, cfg, rollout_is_weights=weights))
    want_v, want_g = value_and_grad(logp, lambda: direct(name, logp, old, adv, seq_adv, mask, cfg, weights, 2))
    assert same(got_v, want_v) and same(got_g, want_g)


# --------------------------------------------------------------------------------------------------
# against verl's built-in losses
# --------------------------------------------------------------------------------------------------


def equivalent_config(name, **extra_fields):
    settings = dict(VERL_EQUIVALENTS[name].settings)
    fields = dict(extra_fields)
    rollout_is = settings.pop("algorithm.rollout_correction.rollout_is", None)
    settings.pop("algorithm.adv_estimator", None)  # the advantage estimator, not a loss setting
    for key, value in settings.items():
        field = key.removeprefix("actor.")
        if field == "policy_loss.loss_mode":
            fields["loss_mode"] = value
        else:
            fields[field] = T if value == GENERATION_BUDGET else value
    return actor(**fields), rollout_is


VERL_BUILT_IN = [n for n, eq in VERL_EQUIVALENTS.items() if eq is not None and eq.trainer == "core_algos"]
"""Compared here to 1e-10; others (GMPO's geo_mean, to ~1e-9) are checked in tests/equivalence/test_verl_family.py."""


@pytest.mark.parametrize("name", VERL_BUILT_IN)
@pytest.mark.parametrize("global_info", [False, True])
def test_equals_verl_builtin_loss(name, global_info):
    cfg, rollout_is = equivalent_config(name)
    if global_info:  # a micro-batch of a 4-rank, 3-micro-batch global batch
        cfg.global_batch_info.update(dp_size=4, batch_num_tokens=97, global_batch_size=72,
                                     loss_scale_factor=cfg.loss_scale_factor)
    logp, old, adv, mask, _ = batch(3, spread=spread_for(name))
    weights = None
    if rollout_is == "token":  # decoupled mode: pi_old (recomputed) / pi_rollout, truncated at a threshold
        raw = torch.exp(0.4 * torch.randn(B, T, generator=torch.Generator().manual_seed(6), dtype=old.dtype))
        weights = raw.clamp(max=2.0)
    builtin = get_policy_loss_fn(cfg.policy_loss.loss_mode)
    ours = get_policy_loss_fn(f"xxpo_{name}")
    args = dict(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=cfg.loss_agg_mode,
                config=cfg, rollout_is_weights=weights)
    verl_v, verl_g = value_and_grad(logp, lambda: builtin(**args))
    our_v, our_g = value_and_grad(logp, lambda: ours(**args))
    assert same(our_v, verl_v) and same(our_g, verl_g), (name, our_v, verl_v)
    assert verl_g.abs().sum() > 0


def test_builtin_comparisons_exercise_the_clips():
    cfg, _ = equivalent_config("ppo")
    logp, old, adv, mask, _ = batch(3)
    _, metrics = get_policy_loss_fn("vanilla")(old, logp, adv, mask, "token-mean", cfg)
    assert metrics["actor/pg_clipfrac"] > 0
    assert metrics["actor/pg_clipfrac_lower"] == 0  # dual clip (A < 0, r > 3) does not bite here: see below
    cfg, _ = equivalent_config("gspo")
    logp, old, adv, mask, _ = batch(3, spread=2e-3)
    _, metrics = get_policy_loss_fn("xxpo_gspo")(old, logp, adv, mask, "seq-mean-token-mean", cfg)
    assert 0 < metrics["actor/xxpo/seq_clip_frac_low"] + metrics["actor/xxpo/seq_clip_frac_high"] < 1


@pytest.mark.parametrize("name", [n for n in VERL_BUILT_IN
                                  if VERL_EQUIVALENTS[n].settings["actor.policy_loss.loss_mode"] == "vanilla"])
def test_dual_clip(name):
    """verl's vanilla loss always dual-clips (clip_ratio_c); every objective compared with it takes dual_clip_c,
    reads clip_ratio_c and stays equal where the third clip bites."""
    assert "dual_clip_c" in V.keyword_parameters(name)
    cfg, rollout_is = equivalent_config(name)
    logp, old, adv, mask, _ = batch(3, spread=1.2)
    weights = torch.full((B, T), 1.3, dtype=old.dtype) if rollout_is else None
    args = dict(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=cfg.loss_agg_mode,
                config=cfg, rollout_is_weights=weights)
    verl_v, metrics = get_policy_loss_fn("vanilla")(**args)
    assert metrics["actor/pg_clipfrac_lower"] > 0
    ours_v, _ = get_policy_loss_fn(f"xxpo_{name}")(**args)
    assert same(ours_v, verl_v)
    args["config"], _ = equivalent_config(name, clip_ratio_c=1e9)  # the third clip off: a different loss
    assert not same(get_policy_loss_fn("vanilla")(**args)[0], verl_v)


def test_dr_grpo_empty_response_difference():
    """verl's seq-mean-token-sum-norm divides by its non-empty responses, xxpo.objectives by all rows;
    xxpo_dr_grpo normalizes as verl does."""
    cfg, _ = equivalent_config("dr_grpo")
    logp, old, adv, mask, seq_adv = batch(4, empty_row=True)
    args = (old, logp, adv, mask, "seq-mean-token-sum-norm", cfg)
    verl_v, _ = value_and_grad(logp, lambda: get_policy_loss_fn("vanilla")(*args))
    ours_v, _ = value_and_grad(logp, lambda: get_policy_loss_fn("xxpo_dr_grpo")(*args))
    plain_v, _ = value_and_grad(logp, lambda: direct("dr_grpo", logp, old, adv, seq_adv, mask, cfg))
    assert same(ours_v, verl_v)
    assert same(plain_v * B / (B - 1), verl_v)


def test_global_batch_normalization_matches_agg_loss():
    """With global_batch_info, every mode is verl's agg_loss of the same per-token losses."""
    logp, old, adv, mask, _ = batch(5)
    for mode in LOSS_AGG_MODES:
        cfg = actor(loss_agg_mode=mode, loss_scale_factor=11, clip_ratio_c=1e9)  # dual clip out of reach
        cfg.global_batch_info.update(dp_size=2, batch_num_tokens=53, global_batch_size=14, loss_scale_factor=11)
        ours, _ = get_policy_loss_fn("xxpo_ppo")(old, logp, adv, mask, mode, cfg)
        r = (logp - old).exp()
        per_token = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
        want = agg_loss(per_token, mask, mode, **cfg.global_batch_info)
        assert same(ours, want), mode


# --------------------------------------------------------------------------------------------------
# verl's own call site, and the traps of its interface
# --------------------------------------------------------------------------------------------------


def test_called_from_verl_actor_loss():
    """verl.workers.utils.losses.ppo_loss (the actor's loss) fetches xxpo_gspo from the registry and calls it."""
    from verl.workers.utils.losses import ppo_loss

    logp, old, adv, mask, seq_adv = batch(7, spread=6e-4)
    prompt_len = torch.tensor([3, 1, 2, 3, 2, 1])
    p = int(prompt_len.max())
    resp_len = mask.sum(-1)
    prompts = torch.ones(B, p, dtype=torch.long)
    attention = torch.cat([torch.arange(p)[None] >= (p - prompt_len)[:, None], mask], 1).long()
    # the unpadded (prompt + response) log-prob stream the actor's forward returns, shifted by one token
    pieces = []
    for i in range(B):
        n = int(prompt_len[i] + resp_len[i])
        piece = torch.zeros(n, dtype=logp.dtype) + logp[i, 0] * 0  # keeps the graph
        idx = torch.arange(int(resp_len[i])) + int(prompt_len[i]) - 1
        piece = piece.index_put((idx,), logp[i, : int(resp_len[i])])
        pieces.append(piece)
    flat = torch.cat(pieces)
    data = TensorDict({"prompts": prompts, "responses": torch.ones(B, T, dtype=torch.long), "attention_mask": attention,
                       "response_mask": mask.long(), "old_log_probs": old, "advantages": adv}, batch_size=[B])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    cfg = actor(loss_mode="xxpo_gspo", loss_agg_mode="seq-mean-token-mean", clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    loss, metrics = ppo_loss(cfg, {"log_probs": flat}, data)
    want = O.gspo_loss(logp, old, seq_adv, mask, clip_eps_low=3e-4, clip_eps_high=4e-4).loss
    assert same(loss, want)
    assert "actor/xxpo/ratio_mean" in metrics


def test_rollout_is_weights_is_the_keyword():
    """verl's type alias names the last argument rollout_log_probs; the keyword verl passes is rollout_is_weights."""
    logp, old, adv, mask, _ = batch(8)
    cfg = actor()
    fn = get_policy_loss_fn("xxpo_ppo")
    fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode="token-mean", config=cfg,
       rollout_is_weights=None)
    with pytest.raises(TypeError, match="rollout_log_probs"):
        fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode="token-mean",
           config=cfg, rollout_log_probs=None)
    with pytest.raises(TypeError, match="rollout_log_probs"):
        get_policy_loss_fn("vanilla")(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                                      loss_agg_mode="token-mean", config=cfg, rollout_log_probs=None)


def test_builtin_sapo_forces_its_aggregation_while_ours_honours_or_refuses():
    logp, old, adv, mask, _ = batch(9)
    cfg = actor()
    sapo = get_policy_loss_fn("sapo")
    a, _ = sapo(old, logp, adv, mask, "token-mean", cfg)
    b, _ = sapo(old, logp, adv, mask, "seq-mean-token-mean", cfg)
    assert same(a, b)  # verl ignores loss_agg_mode for sapo
    ours_tm, _ = get_policy_loss_fn("xxpo_sapo")(old, logp, adv, mask, "token-mean", cfg)
    assert not same(ours_tm, a)  # xxpo_sapo honours it
    assert same(ours_tm, O.sapo_loss(logp, old, adv, mask, loss_agg_mode="token-mean").loss)
    # verl 0.9.1's gspo honours loss_agg_mode; xxpo_gspo, whose objective fixes it, refuses another one
    g1, _ = get_policy_loss_fn("gspo")(old, logp, adv, mask, "token-mean", cfg)
    g2, _ = get_policy_loss_fn("gspo")(old, logp, adv, mask, "seq-mean-token-mean", cfg)
    assert not same(g1, g2)
    with pytest.raises(ValueError, match="aggregates as 'seq-mean-token-mean'"):
        get_policy_loss_fn("xxpo_gspo")(old, logp, adv, mask, "token-mean", cfg)


def test_builtin_gspo_and_sapo_need_an_actor_config_ours_take_a_dictconfig():
    logp, old, adv, mask, seq_adv = batch(10, spread=6e-4)
    d = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4, "clip_ratio_c": 3.0,
                          "tau_pos": 1.0, "tau_neg": 1.05, "loss_scale_factor": None, "global_batch_info": {}})
    for builtin in ("gspo", "sapo"):
        with pytest.raises(AssertionError):
            get_policy_loss_fn(builtin)(old, logp, adv, mask, "seq-mean-token-mean", d)
    ours, _ = get_policy_loss_fn("xxpo_gspo")(old, logp, adv, mask, "seq-mean-token-mean", d)
    assert same(ours, O.gspo_loss(logp, old, seq_adv, mask).loss)


def test_sum_norm_needs_loss_scale_factor():
    """verl's default normalizer for seq-mean-token-sum-norm is the padded width of each micro-batch."""
    logp, old, adv, mask, _ = batch(11)
    cfg = actor(loss_agg_mode="seq-mean-token-sum-norm")
    narrow, _ = get_policy_loss_fn("vanilla")(old, logp, adv, mask, cfg.loss_agg_mode, cfg)
    pad = lambda x: torch.cat([x, torch.zeros(B, 3, dtype=x.dtype)], 1)  # noqa: E731
    wide, _ = get_policy_loss_fn("vanilla")(pad(old), pad(logp), pad(adv), pad(mask), cfg.loss_agg_mode, cfg)
    assert same(narrow * T / (T + 3), wide)  # padding alone rescales verl's loss
    for name in ("dr_grpo", "ppo"):
        with pytest.raises(ValueError, match="loss_scale_factor"):
            get_policy_loss_fn(f"xxpo_{name}")(old, logp, adv, mask, cfg.loss_agg_mode, cfg)


def test_gspo_reduces_or_refuses_per_token_advantages():
    logp, old, adv, mask, seq_adv = batch(12, spread=6e-4)
    cfg = actor(loss_agg_mode="seq-mean-token-mean", clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    ours, _ = get_policy_loss_fn("xxpo_gspo")(old, logp, adv, mask, cfg.loss_agg_mode, cfg)
    assert same(ours, O.gspo_loss(logp, old, seq_adv, mask, clip_eps_low=3e-4, clip_eps_high=4e-4).loss)
    gae_like = adv + 0.05 * torch.arange(T, dtype=adv.dtype) * mask
    with pytest.raises(ValueError, match="gspo_token"):
        get_policy_loss_fn("xxpo_gspo")(old, logp, gae_like, mask, cfg.loss_agg_mode, cfg)
    tok_v, _ = get_policy_loss_fn("xxpo_gspo_token")(old, logp, gae_like, mask, cfg.loss_agg_mode, cfg)
    assert same(tok_v, O.gspo_token_loss(logp, old, gae_like, mask, clip_eps_low=3e-4, clip_eps_high=4e-4).loss)


def test_refusals():
    logp, old, adv, mask, _ = batch(13)
    cfg = actor()
    w = torch.ones(B, T, dtype=old.dtype)
    with pytest.raises(ValueError, match="rollout correction"):
        get_policy_loss_fn("xxpo_decoupled_ppo")(old, logp, adv, mask, "token-mean", cfg)
    with pytest.raises(ValueError, match="only xxpo_decoupled_ppo"):
        get_policy_loss_fn("xxpo_grpo")(old, logp, adv, mask, "token-mean", cfg, rollout_is_weights=w)
    with pytest.raises(ValueError, match="staleness"):
        get_policy_loss_fn("xxpo_a3po")(old, logp, adv, mask, "token-mean", cfg)
    with pytest.raises(ValueError, match="config"):
        get_policy_loss_fn("xxpo_ppo")(old, logp, adv, mask, "token-mean", None)
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        get_policy_loss_fn("xxpo_ppo")(old, logp, adv, mask, "token-sum", cfg)
    with pytest.raises(ValueError, match="actor.clip_ratio_low"):
        V.register({"ppo": {"clip_eps_low": 0.1}})
    with pytest.raises(ValueError, match="not policy objectives"):
        V.register({"dpo": {}})
    bad = w.clone()
    bad[0, 0] = 0.0
    with pytest.raises(ValueError, match="finite and > 0"):
        get_policy_loss_fn("xxpo_decoupled_ppo")(old, logp, adv, mask, "token-mean", cfg, rollout_is_weights=bad)


def test_register_overrides_pass_objective_arguments():
    logp, old, adv, mask, _ = batch(14)
    cfg = actor()
    try:
        V.register({"a3po": {"staleness": 4, "behav_weight_cap": 1.5}})
        got, _ = get_policy_loss_fn("xxpo_a3po")(old, logp, adv, mask, "token-mean", cfg)
        want = O.a3po_loss(logp, old, adv, mask, 4, clip_eps_low=0.2, clip_eps_high=0.2, behav_weight_cap=1.5).loss
        assert same(got, want)
    finally:
        V.register()


def test_verl_kl_loss_is_xxpo_k3_below_its_clamp():
    """verl keeps the KL term out of policy losses (actor.use_kl_loss); its low_var_kl is xxpo's k3, value and
    gradient, while the estimate stays under verl's output clamp of 10; k3+ has k2's gradient."""
    from verl.trainer.ppo.core_algos import kl_penalty as verl_kl

    from xxpo.functional import kl_penalty

    logp, _, _, _, _ = batch(15)
    ref = logp.detach() + 0.8 * torch.randn(B, T, generator=torch.Generator().manual_seed(1), dtype=logp.dtype)
    for verl_name, ours_name in (("low_var_kl", "k3"), ("k3", "k3"), ("mse", "k2")):
        v, g = value_and_grad(logp, lambda: verl_kl(logp, ref, verl_name).sum())
        o, h = value_and_grad(logp, lambda: kl_penalty(logp, ref, ours_name).sum())
        assert same(v, o) and same(g, h), verl_name
    _, g_plus = value_and_grad(logp, lambda: verl_kl(logp, ref, "k3+").sum())
    _, g_k2 = value_and_grad(logp, lambda: kl_penalty(logp, ref, "k2").sum())
    assert same(g_plus, g_k2)
    far = logp.detach() + 15.0  # k3 = e^-15 + 14 > 10: verl clamps the value (and kills the gradient)
    v, _ = value_and_grad(logp, lambda: verl_kl(logp, far, "low_var_kl").sum())
    assert float(v) == pytest.approx(10.0 * B * T)


def test_book_registration_snippet_runs():
    """The verl code block of book/integrations.md (not executed by the book tests: it needs verl) runs here."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "book" / "integrations.md").read_text()
    blocks = [b for b in re.findall(r"^```\{code-block\} python\n(.*?)^```", page, re.M | re.S)
              if "xxpo.integrations.verl" in b]
    assert len(blocks) == 1
    try:
        exec(compile(blocks[0], "integrations.md:verl", "exec"), {"__name__": "__book__"})
        logp, old, adv, mask, _ = batch(16)
        got, _ = get_policy_loss_fn("xxpo_a3po")(old, logp, adv, mask, "token-mean", actor())
        assert same(got, O.a3po_loss(logp, old, adv, mask, 1, clip_eps_low=0.2, clip_eps_high=0.2).loss)
    finally:
        V.register()
