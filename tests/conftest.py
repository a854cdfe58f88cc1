"""Shared fixtures: an independent plain-Python oracle for the objectives, batch builders, the
engine tests' tokenizer and freshly built tiny models (one per test module), and a local Hugging Face
model directory with a JSONL task (the inputs of the notebooks' gpu profile, built offline).

The oracle (fixture ``ref``) recomputes every loss, gradient and metric from the formulas in
``shared/reference/algorithms.md`` with Python floats and loops. It never calls ``xxpo``, so a test
that compares ``xxpo`` against it can fail.
"""

import math
import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from xxpo.models import MODEL_PRESETS, build_model  # noqa: E402
from xxpo.tasks import make_tokenizer  # noqa: E402

CLAMP = 20.0  # the log-ratio clamp of the API (LOG_RATIO_CLAMP)


# --------------------------------------------------------------------------------------------------
# scalar helpers
# --------------------------------------------------------------------------------------------------


def _clamp(x, lo=-CLAMP, hi=CLAMP):
    return min(max(x, lo), hi)


def _sigmoid(x):
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _ratio(log_ratio):
    """r = exp(clamp(lr)) and dr/dlogp (0 outside the clamp, where clamp has no gradient)."""
    r = math.exp(_clamp(log_ratio))
    return r, (r if -CLAMP < log_ratio < CLAMP else 0.0)


def _adv_matrix(adv, shape):
    b, t = shape
    if not isinstance(adv[0], list):
        return [[a] * t for a in adv]
    return adv


def _valid(mask):
    return [(i, t) for i, row in enumerate(mask) for t, m in enumerate(row) if m]


def _mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


# --------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------


def agg_weights(mask, mode, norm_len=None):
    """w[i][t] with loss = sum w * l (every mode is linear in the per-token loss)."""
    n = [sum(1 for m in row if m) for row in mask]
    nonempty = sum(1 for k in n if k > 0)
    total = sum(n)
    out = []
    for i, row in enumerate(mask):
        if mode == "token-mean":
            d = total
        elif mode == "seq-mean-token-mean":
            d = n[i] * nonempty
        elif mode == "seq-mean-token-sum":
            d = nonempty
        elif mode == "seq-mean-token-sum-norm":
            d = len(mask) * norm_len
        else:
            raise AssertionError(mode)
        out.append([1.0 / d if m else 0.0 for m in row])
    return out


def aggregate(loss, mask, mode, norm_len=None):
    w = agg_weights(mask, mode, norm_len)
    return sum(wi * li for wr, lr in zip(w, loss) for wi, li in zip(wr, lr) if wi)


def _scale(w, g):
    return [[wi * gi if wi else 0.0 for wi, gi in zip(wr, gr)] for wr, gr in zip(w, g)]


# --------------------------------------------------------------------------------------------------
# clipped policy losses
# --------------------------------------------------------------------------------------------------


def ppo_token(log_ratio, a, eps_low, eps_high, dual_c=None):
    """Per-token l = -min(rA, clip(r)A) (capped at -cA when A<0) and dl/dlogp."""
    r, dr = _ratio(log_ratio)
    unclipped = r * a
    clipped = min(max(r, 1.0 - eps_low), 1.0 + eps_high) * a
    if unclipped <= clipped:
        loss, grad = -unclipped, -a * dr
    else:  # r outside the range on the side where the clip removes the gradient
        loss, grad = -clipped, 0.0
    if dual_c is not None and a < 0 and loss > -dual_c * a:
        loss, grad = -dual_c * a, 0.0
    return loss, grad


def _clip_metrics(ratios_adv, eps_low, eps_high, dual_c=None):
    """ratios_adv: list of (log_ratio, A) over valid tokens."""
    rs = [math.exp(_clamp(lr)) for lr, _ in ratios_adv]
    low = _mean([float(a < 0 and r < 1 - eps_low) for r, (_, a) in zip(rs, ratios_adv)])
    high = _mean([float(a > 0 and r > 1 + eps_high) for r, (_, a) in zip(rs, ratios_adv)])
    dual = _mean([float(dual_c is not None and a < 0 and r > dual_c) for r, (_, a) in zip(rs, ratios_adv)])
    return {
        "clip_frac_low": low,
        "clip_frac_high": high,
        "clip_frac": low + high,
        "dual_clip_frac": dual,
        "ratio_mean": _mean(rs),
        "ratio_min": min(rs) if rs else 0.0,
        "ratio_max": max(rs) if rs else 0.0,
        "approx_kl": _mean([r - 1 - _clamp(lr) for r, (lr, _) in zip(rs, ratios_adv)]),
    }


def ppo(logp, old, adv, mask, eps_low=0.2, eps_high=None, dual_c=None, mode="token-mean", norm_len=None):
    """Returns (loss, dloss/dlogp as nested list, metrics)."""
    eps_high = eps_low if eps_high is None else eps_high
    a = _adv_matrix(adv, (len(logp), len(logp[0])))
    per = [
        [ppo_token(lp - o, ai, eps_low, eps_high, dual_c) for lp, o, ai in zip(lr, orow, arow)]
        for lr, orow, arow in zip(logp, old, a)
    ]
    loss_mat = [[x[0] for x in row] for row in per]
    grad_mat = [[x[1] for x in row] for row in per]
    w = agg_weights(mask, mode, norm_len)
    loss = aggregate(loss_mat, mask, mode, norm_len)
    valid = _valid(mask)
    metrics = _clip_metrics([(logp[i][t] - old[i][t], a[i][t]) for i, t in valid], eps_low, eps_high, dual_c)
    return loss, _scale(w, grad_mat), metrics


def kl_token(logp, ref_logp, estimator):
    """(value, d/dlogp) of the per-token KL estimator with log_rho = clamp(ref - logp)."""
    raw = ref_logp - logp
    lr = _clamp(raw)
    inside = -CLAMP < raw < CLAMP
    if estimator == "k1":
        return -lr, (1.0 if inside else 0.0)
    if estimator == "k2":
        return 0.5 * lr * lr, (-lr if inside else 0.0)
    if estimator == "k3":
        return math.exp(lr) - 1 - lr, ((1.0 - math.exp(lr)) if inside else 0.0)
    raise AssertionError(estimator)


def grpo(logp, old, adv, mask, eps_low=0.2, eps_high=None, ref_logp=None, kl_coef=0.0, kl_estimator="k3",
         mode="seq-mean-token-mean", norm_len=None, dual_c=None):
    eps_high = eps_low if eps_high is None else eps_high
    a = _adv_matrix(adv, (len(logp), len(logp[0])))
    loss_mat, grad_mat, kl_vals = [], [], []
    for i, row in enumerate(logp):
        lrow, grow = [], []
        for t, lp in enumerate(row):
            l, g = ppo_token(lp - old[i][t], a[i][t], eps_low, eps_high, dual_c)
            if ref_logp is not None:
                k, dk = kl_token(lp, ref_logp[i][t], kl_estimator)
                l, g = l + kl_coef * k, g + kl_coef * dk
                if mask[i][t]:
                    kl_vals.append(k)
            lrow.append(l)
            grow.append(g)
        loss_mat.append(lrow)
        grad_mat.append(grow)
    w = agg_weights(mask, mode, norm_len)
    valid = _valid(mask)
    metrics = _clip_metrics([(logp[i][t] - old[i][t], a[i][t]) for i, t in valid], eps_low, eps_high, dual_c)
    if ref_logp is not None:
        metrics["kl"] = _mean(kl_vals)
    return aggregate(loss_mat, mask, mode, norm_len), _scale(w, grad_mat), metrics


def _seq_ratio(logp_row, old_row, mask_row):
    idx = [t for t, m in enumerate(mask_row) if m]
    if not idx:
        return 0.0, 0, False
    raw = sum(logp_row[t] - old_row[t] for t in idx) / len(idx)
    return _clamp(raw), len(idx), (-CLAMP < raw < CLAMP)


def gspo(logp, old, adv, mask, eps_low=3e-4, eps_high=4e-4):
    """Sequence-level GSPO. adv: list of B floats."""
    rows = [_seq_ratio(logp[i], old[i], mask[i]) for i in range(len(logp))]
    nonempty = [i for i, (_, n, _) in enumerate(rows) if n > 0]
    total_tokens = sum(rows[i][1] for i in nonempty)
    loss, grad = 0.0, [[0.0] * len(logp[0]) for _ in logp]
    low_seq, high_seq, low_tok, high_tok, ratios = 0, 0, 0, 0, []
    for i in nonempty:
        lr, n, inside = rows[i]
        s = math.exp(lr)
        ratios.append(s)
        a = adv[i]
        unclipped, clipped = s * a, min(max(s, 1 - eps_low), 1 + eps_high) * a
        if unclipped <= clipped:
            li, dl_ds = -unclipped, -a
        else:
            li, dl_ds = -clipped, 0.0
        loss += li / len(nonempty)
        for t, m in enumerate(mask[i]):
            if m and inside:
                grad[i][t] = dl_ds * s / n / len(nonempty)
        if a < 0 and s < 1 - eps_low:
            low_seq, low_tok = low_seq + 1, low_tok + n
        if a > 0 and s > 1 + eps_high:
            high_seq, high_tok = high_seq + 1, high_tok + n
    k = len(nonempty)
    metrics = {
        "seq_clip_frac_low": low_seq / k if k else 0.0,
        "seq_clip_frac_high": high_seq / k if k else 0.0,
        "clip_frac_low": low_tok / total_tokens if total_tokens else 0.0,
        "clip_frac_high": high_tok / total_tokens if total_tokens else 0.0,
        "clip_frac": (low_tok + high_tok) / total_tokens if total_tokens else 0.0,
        "ratio_mean": _mean(ratios),
        "ratio_min": min(ratios) if ratios else 0.0,
        "ratio_max": max(ratios) if ratios else 0.0,
    }
    return loss, grad, metrics


def gspo_token(logp, old, adv, mask, eps_low=3e-4, eps_high=4e-4):
    """GSPO-token: value s_i per token, d s_it / d logp_t = s_i, seq-mean-token-mean aggregation."""
    a = _adv_matrix(adv, (len(logp), len(logp[0])))
    loss_mat, grad_mat, pairs = [], [], []
    for i in range(len(logp)):
        lr, n, _ = _seq_ratio(logp[i], old[i], mask[i])
        s = math.exp(lr)
        lrow, grow = [], []
        for t in range(len(logp[i])):
            ai = a[i][t]
            unclipped, clipped = s * ai, min(max(s, 1 - eps_low), 1 + eps_high) * ai
            if unclipped <= clipped:
                lrow.append(-unclipped)
                grow.append(-ai * s)
            else:
                lrow.append(-clipped)
                grow.append(0.0)
            if mask[i][t]:
                pairs.append((s, ai))
        loss_mat.append(lrow)
        grad_mat.append(grow)
    mode = "seq-mean-token-mean"
    w = agg_weights(mask, mode)
    low = _mean([float(ai < 0 and s < 1 - eps_low) for s, ai in pairs])
    high = _mean([float(ai > 0 and s > 1 + eps_high) for s, ai in pairs])
    rs = [s for s, _ in pairs]
    metrics = {
        "clip_frac_low": low,
        "clip_frac_high": high,
        "clip_frac": low + high,
        "ratio_mean": _mean(rs),
        "ratio_min": min(rs) if rs else 0.0,
        "ratio_max": max(rs) if rs else 0.0,
    }
    return aggregate(loss_mat, mask, mode), _scale(w, grad_mat), metrics


def sapo(logp, old, adv, mask, tau_pos=1.0, tau_neg=1.05, mode="seq-mean-token-mean", norm_len=None):
    a = _adv_matrix(adv, (len(logp), len(logp[0])))
    loss_mat, grad_mat, gates, weights, rs = [], [], [], [], []
    for i in range(len(logp)):
        lrow, grow = [], []
        for t in range(len(logp[i])):
            ai = a[i][t]
            tau = tau_pos if ai > 0 else tau_neg
            r, dr = _ratio(logp[i][t] - old[i][t])
            p = _sigmoid(tau * (r - 1))
            lrow.append(-(4 / tau) * p * ai)
            grow.append(-4 * p * (1 - p) * dr * ai)
            if mask[i][t]:
                gates.append(4 / tau * p)
                weights.append(4 * p * (1 - p))
                rs.append(r)
        loss_mat.append(lrow)
        grad_mat.append(grow)
    w = agg_weights(mask, mode, norm_len)
    metrics = {
        "gate_mean": _mean(gates),
        "gate_weight_mean": _mean(weights),
        "ratio_mean": _mean(rs),
        "ratio_min": min(rs) if rs else 0.0,
        "ratio_max": max(rs) if rs else 0.0,
    }
    return aggregate(loss_mat, mask, mode, norm_len), _scale(w, grad_mat), metrics


def decoupled(logp, behav, prox, adv, mask, eps_low=0.2, eps_high=None, cap=None, mode="token-mean",
              norm_len=None, dual_c=None):
    eps_high = eps_low if eps_high is None else eps_high
    a = _adv_matrix(adv, (len(logp), len(logp[0])))
    loss_mat, grad_mat, ws = [], [], []
    for i in range(len(logp)):
        lrow, grow = [], []
        for t in range(len(logp[i])):
            wgt = math.exp(_clamp(prox[i][t] - behav[i][t]))
            if cap is not None:
                wgt = min(wgt, cap)
            l, g = ppo_token(logp[i][t] - prox[i][t], a[i][t], eps_low, eps_high, dual_c)
            lrow.append(wgt * l)
            grow.append(wgt * g)
            if mask[i][t]:
                ws.append(wgt)
        loss_mat.append(lrow)
        grad_mat.append(grow)
    w = agg_weights(mask, mode, norm_len)
    valid = _valid(mask)
    metrics = _clip_metrics([(logp[i][t] - prox[i][t], a[i][t]) for i, t in valid], eps_low, eps_high, dual_c)
    metrics["behav_weight_mean"] = _mean(ws)
    metrics["behav_weight_max"] = max(ws) if ws else 0.0
    return aggregate(loss_mat, mask, mode, norm_len), _scale(w, grad_mat), metrics


def value_loss(values, old, returns, mask, clip_eps=0.2, mode="token-mean"):
    loss_mat, grad_mat, clipped_flags, vs = [], [], [], []
    for i in range(len(values)):
        lrow, grow = [], []
        for t in range(len(values[i])):
            v, o, rr = values[i][t], old[i][t], returns[i][t]
            un = (v - rr) ** 2
            if clip_eps is None:
                lrow.append(0.5 * un)
                grow.append(v - rr)
                flag = False
            else:
                vc = o + _clamp(v - o, -clip_eps, clip_eps)
                cl = (vc - rr) ** 2
                flag = cl > un and abs(v - o) > clip_eps  # inside the band the branches are equal up to rounding
                if flag:
                    lrow.append(0.5 * cl)
                    grow.append(0.0)  # the clamp is active whenever the clipped branch is strictly larger
                else:
                    lrow.append(0.5 * un)
                    grow.append(v - rr)
            if mask[i][t]:
                clipped_flags.append(float(flag))
                vs.append(v)
        loss_mat.append(lrow)
        grad_mat.append(grow)
    w = agg_weights(mask, mode)
    metrics = {"vf_clip_frac": _mean(clipped_flags), "value_mean": _mean(vs)}
    return aggregate(loss_mat, mask, mode), _scale(w, grad_mat), metrics


# --------------------------------------------------------------------------------------------------
# preference losses
# --------------------------------------------------------------------------------------------------


def dpo(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, variant="sigmoid", label_smoothing=0.0):
    """Returns (loss, d/dchosen, d/drejected, metrics)."""
    b = len(chosen)
    loss, gc, gr = 0.0, [], []
    rc, rrj = [], []
    for c, r, c0, r0 in zip(chosen, rejected, ref_chosen, ref_rejected):
        h = (c - c0) - (r - r0)
        if variant == "sigmoid":
            e = label_smoothing
            li = -(1 - e) * _log_sigmoid(beta * h) - e * _log_sigmoid(-beta * h)
            dh = -(1 - e) * beta * _sigmoid(-beta * h) + e * beta * _sigmoid(beta * h)
        else:
            li = (h - 1 / (2 * beta)) ** 2
            dh = 2 * (h - 1 / (2 * beta))
        loss += li / b
        gc.append(dh / b)
        gr.append(-dh / b)
        rc.append(beta * (c - c0))
        rrj.append(beta * (r - r0))
    margins = [x - y for x, y in zip(rc, rrj)]
    metrics = {
        "reward_chosen": _mean(rc),
        "reward_rejected": _mean(rrj),
        "reward_margin": _mean(margins),
        "reward_accuracy": _mean([float(m > 0) for m in margins]),
    }
    return loss, gc, gr, metrics


def sppo_selfplay(logp, ref, win, eta=1000.0):
    b = len(logp)
    res = [lp - r0 - eta * (p - 0.5) for lp, r0, p in zip(logp, ref, win)]
    loss = sum(x * x for x in res) / b
    grad = [2 * x / b for x in res]
    metrics = {
        "log_ratio_mean": _mean([lp - r0 for lp, r0 in zip(logp, ref)]),
        "target_mean": _mean([eta * (p - 0.5) for p in win]),
    }
    return loss, grad, metrics


def sequence_value(logits, rewards):
    b = len(logits)
    loss = sum(-(y * _log_sigmoid(z) + (1 - y) * _log_sigmoid(-z)) for z, y in zip(logits, rewards)) / b
    grad = [(_sigmoid(z) - y) / b for z, y in zip(logits, rewards)]
    vm = _mean([_sigmoid(z) for z in logits])
    return loss, grad, {"value_mean": vm, "calibration_error": abs(vm - _mean(rewards))}


# --------------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------------


def _std(xs, unbiased):
    m = sum(xs) / len(xs)
    d = len(xs) - 1 if unbiased else len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / d)


def group_advantages(rewards, g, adv_norm="group", eps=1e-6, unbiased=True):
    out = []
    groups = [rewards[k:k + g] for k in range(0, len(rewards), g)]
    centred = []
    for grp in groups:
        if all(x == grp[0] for x in grp):
            centred.append([0.0] * g)
        else:
            m = sum(grp) / g
            centred.append([x - m for x in grp])
    if adv_norm == "none":
        return [x for c in centred for x in c]
    if adv_norm == "group":
        for grp, c in zip(groups, centred):
            if all(x == 0.0 for x in c):
                out.extend(c)
            else:
                sd = _std(grp, unbiased)
                out.extend(x / (sd + eps) for x in c)
        return out
    flat = [x for c in centred for x in c]
    sd = _std(flat, unbiased)
    return [x / (sd + eps) for x in flat]


def leave_one_out(rewards, g):
    out = []
    for k in range(0, len(rewards), g):
        grp = rewards[k:k + g]
        for i, x in enumerate(grp):
            out.append(x - (sum(grp) - x) / (g - 1))
    return out


def gae(rewards, values, mask, gamma, lam):
    """Run GAE on the valid positions of each row only (holes are skipped), scatter back; 0 elsewhere."""
    adv = [[0.0] * len(r) for r in rewards]
    ret = [[0.0] * len(r) for r in rewards]
    for i in range(len(rewards)):
        idx = [t for t, m in enumerate(mask[i]) if m]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[i][t] + gamma * next_value - values[i][t]
            a = delta + gamma * lam * next_adv
            adv[i][t] = a
            ret[i][t] = a + values[i][t]
            next_value, next_adv = values[i][t], a
    return adv, ret


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ref():
    """Namespace of the independent reference implementations above."""
    return types.SimpleNamespace(
        CLAMP=CLAMP,
        sigmoid=_sigmoid,
        log_sigmoid=_log_sigmoid,
        agg_weights=agg_weights,
        aggregate=aggregate,
        ppo_token=ppo_token,
        ppo=ppo,
        kl_token=kl_token,
        grpo=grpo,
        gspo=gspo,
        gspo_token=gspo_token,
        sapo=sapo,
        decoupled=decoupled,
        value_loss=value_loss,
        dpo=dpo,
        sppo_selfplay=sppo_selfplay,
        sequence_value=sequence_value,
        group_advantages=group_advantages,
        leave_one_out=leave_one_out,
        gae=gae,
    )


# A ragged mask used across the unit tests: a full row, a short row, a row with a hole, an empty row,
# and a one-token row. Masked positions carry "poison" log-probs that would change the loss if they
# leaked in.
RAGGED_MASK = [
    [1, 1, 1, 1, 1],
    [1, 1, 0, 0, 0],
    [1, 0, 1, 1, 0],
    [0, 0, 0, 0, 0],
    [1, 0, 0, 0, 0],
]


def _away(x, points, gap):
    for p in points:
        if abs(x - p) < gap:
            x = p + (gap if x >= p else -gap)
    return x


def make_policy_batch(seed, mask=RAGGED_MASK, spread=0.6, per_token_adv=False, avoid=(0.8, 1.2),
                      dtype=torch.float64):
    """(logp, old_logp, advantages, mask) with ratios spread over clipped and unclipped regions.

    Valid-token ratios are kept at least 2e-3 away from every value in ``avoid`` (clip boundaries),
    so the loss is differentiable there and the hand-derived gradient is unambiguous.
    """
    g = torch.Generator().manual_seed(seed)
    b, t = len(mask), len(mask[0])
    old = -0.2 - 2.0 * torch.rand(b, t, generator=g, dtype=torch.float64)  # (B, T)
    lr = (2 * torch.rand(b, t, generator=g, dtype=torch.float64) - 1) * spread  # (B, T)
    lr_list = lr.tolist()
    for i in range(b):
        for j in range(t):
            r = _away(math.exp(lr_list[i][j]), avoid, 2e-3)
            lr_list[i][j] = math.log(r)
            if not mask[i][j]:
                lr_list[i][j] = 3.0  # poison: a big ratio that must not leak
    logp = old + torch.tensor(lr_list, dtype=torch.float64)
    if per_token_adv:
        adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    else:
        adv = torch.randn(b, generator=g, dtype=torch.float64)
        adv[0] = abs(adv[0]) + 0.1
        adv[1] = -abs(adv[1]) - 0.1
    m = torch.tensor(mask, dtype=torch.float64)
    return logp.to(dtype), old.to(dtype), adv.to(dtype), m.to(dtype)


@pytest.fixture(scope="session")
def policy_batch():
    return make_policy_batch


def to_list(x):
    return x.detach().to(torch.float64).tolist()


@pytest.fixture(scope="session")
def tl():
    return to_list


# --------------------------------------------------------------------------------------------------
# engine: the character tokenizer and untrained tiny models, fresh in every test module
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def dense(tok):
    return build_model(MODEL_PRESETS["tiny"], tok, seed=0)


@pytest.fixture(scope="module")
def moe(tok):
    return build_model(MODEL_PRESETS["tiny-moe"], tok, seed=0)


# --------------------------------------------------------------------------------------------------
# a local Hugging Face model directory and a JSONL task: the gpu profile's inputs, built offline
# --------------------------------------------------------------------------------------------------
#
# The directory holds a byte-level BPE tokenizer trained on the fly with the ``tokenizers`` library (a
# real ``tokenizer.json``) with a Qwen-style chat template, and a randomly initialised tiny Qwen2 model
# saved in bfloat16, as released checkpoints are. Its output layer is zero, so its first samples are
# uniform over the vocabulary whatever the float rounding: about one response in ten ends with the right
# single-digit answer, GRPO's groups get reward variance, and the update has a real gradient.

LOCAL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LOCAL_CONTEXT = 96  # max_position_embeddings of the saved model: smaller than the JSONL task's default budget


def single_digit_sums(n):
    """``n`` JSONL records ``{"prompt", "answer"}`` whose answers are GSM8K-style worked solutions ``... #### k``."""
    pairs = [(a, b) for a in range(10) for b in range(10 - a)][:n]
    return [{"prompt": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in pairs]


@pytest.fixture(scope="session")
def jsonl_data(tmp_path_factory):
    """A JSONL task file of 30 single-digit sums (``jsonl:PATH`` holds out 3 of them as the test split)."""
    import json

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in single_digit_sums(30)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def local_model_dir(tmp_path_factory):
    """A saved tiny Qwen2 model directory with its own tokenizer and chat template (context LOCAL_CONTEXT)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-qwen2")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([r["prompt"] + " " + r["answer"] for r in single_digit_sums(30)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=LOCAL_CHAT_TEMPLATE)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=LOCAL_CONTEXT,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform first samples (see above)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert (path / "tokenizer.json").is_file()
    return path
