"""Per-token log-probabilities and entropy, from logits or from hidden states.

From logits (:func:`selective_log_softmax`, :func:`entropy_from_logits`): a naive
``logits.float().log_softmax(-1).gather(...)`` materializes a float32 ``(B, T, V)`` tensor; these compute
``logit[token] - logsumexp(logits)`` one chunk of rows at a time, so the forward's extra memory is
``chunk_size * V`` floats whatever ``B * T`` is. The logits themselves, and their gradient in the
backward pass, are still full size.

From hidden states (:func:`logprobs_from_hidden`): the LM head is applied inside, one tile of rows x
vocabulary entries at a time, and recomputed in the backward pass, so no ``(B, T, V)`` tensor exists at
all. With a real vocabulary (151,936 tokens) this is what lets long responses fit
(``benchmarks/logprob_memory.py``).
"""

from __future__ import annotations

import torch

from xxpo.functional.checks import check_number, check_tensor


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(logits)[..., index] for ``logits`` (..., V) and integer ``index`` (...).

    Works in float32 (or float64 for float64 logits) one chunk of ``chunk_size`` rows at a time and
    returns that dtype, shape ``index.shape``. Gradients flow to ``logits``.
    """
    check_tensor("logits", logits, ndim=range(2, 5), finite=False)
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
        raise TypeError("index must be an integer (int64 or int32) tensor")
    if index.shape != logits.shape[:-1]:
        raise ValueError(f"index must have shape {tuple(logits.shape[:-1])}, got {tuple(index.shape)}")
    check_number("chunk_size", chunk_size, low=1)
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (N, V)
    flat_index = index.reshape(-1, 1).long()  # (N, 1)
    pieces = []
    for start in range(0, flat_logits.shape[0], chunk_size):
        chunk = flat_logits[start : start + chunk_size].to(out_dtype)  # (n, V)
        picked = chunk.gather(-1, flat_index[start : start + chunk_size]).squeeze(-1)  # (n,)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    if not pieces:
        return flat_logits.new_zeros(index.shape, dtype=out_dtype)
    return torch.cat(pieces).reshape(index.shape)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension, shape ``logits.shape[:-1]``, chunked like above."""
    check_tensor("logits", logits, ndim=range(2, 5), finite=False)
    check_number("chunk_size", chunk_size, low=1)
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    pieces = []
    for start in range(0, flat.shape[0], chunk_size):
        chunk = flat[start : start + chunk_size].to(out_dtype)  # (n, V)
        logp = chunk.log_softmax(-1)
        pieces.append(-(logp.exp() * logp).sum(-1))
    if not pieces:
        return flat.new_zeros(logits.shape[:-1], dtype=out_dtype)
    return torch.cat(pieces).reshape(logits.shape[:-1])


# --------------------------------------------------------------------------------------------------
# From hidden states: the LM head, temperature, log-softmax, gather and entropy, one chunk of rows at a time
# --------------------------------------------------------------------------------------------------

CHUNK_ROWS = 1024
"""Default rows per chunk of :func:`logprobs_from_hidden` (all rows when there are fewer)."""
TILE_ELEMENTS = 2**21
"""Logits per tile of :func:`logprobs_from_hidden`: a chunk of ``chunk_rows`` rows meets the vocabulary in
blocks of ``max(1, TILE_ELEMENTS // chunk_rows)`` entries (2,048 for 1,024 rows: 8 MB of float32 logits)."""


def _math_dtype(hidden: torch.Tensor) -> torch.dtype:
    """float64 for float64 hidden states (gradcheck), else float32: log-softmax never runs in half precision."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


class _HiddenLogprobs(torch.autograd.Function):
    """log softmax((h W^T + b) / temperature)[target] and its entropy, one chunk of rows at a time.

    The rows are taken ``chunk_rows`` at a time and each chunk meets the vocabulary in blocks of
    ``block`` entries: a tile of logits is ``(n, vb)``, computed in the matmul dtype (the autocast dtype
    under autocast, else the common dtype of ``h`` and ``W``), then cast to float32 and divided by the
    temperature, z = logits / temperature. Large row chunks keep the products efficient (``W`` is read
    once per chunk), small vocabulary blocks keep the memory small.

    Forward: an online logsumexp over the blocks of a chunk (a running max ``m``, ``s = sum exp(z - m)``,
    and for the entropy ``x = sum exp(z - m) z``, rescaled when ``m`` grows) and the target's logit;
    ``logp = z_target - logsumexp(z)``, ``entropy = logsumexp(z) - x / s``. Saved for backward: the inputs,
    ``logsumexp`` and the entropy of each row.

    Backward: recompute each tile's logits and form the gradient with respect to z,

        d logp / dz_j    = 1[j = target] - p_j
        d entropy / dz_j = -p_j (log p_j + entropy)

    which needs only the tile, the row's saved ``logsumexp`` and entropy; then ``grad_h[rows] += (g / T)
    W[block]`` and ``grad_W[block] += (g / T)^T h[rows]``, accumulated in float32. At most a tile of
    logits and its gradient exist at a time, never ``(N, V)``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_rows, block, with_entropy):
        ctx.set_materialize_grads(False)  # an entropy used only for logging sends no gradient
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            mm_dtype = torch.get_autocast_dtype(device_type)
        else:
            mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        math_dtype = _math_dtype(hidden)
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        logz = hidden.new_empty(n_rows, dtype=math_dtype)  # (N,)
        logp = hidden.new_empty(n_rows, dtype=math_dtype)  # (N,)
        entropy = hidden.new_empty(n_rows, dtype=math_dtype) if with_entropy else None  # (N,)
        with torch.autocast(device_type, enabled=False):
            w = weight.to(mm_dtype)  # (V, H)
            b = None if bias is None else bias.to(mm_dtype)  # (V,)
            for start in range(0, n_rows, chunk_rows):
                rows = slice(start, start + chunk_rows)
                h, y = hidden[rows], targets[rows]  # (n, H), (n,)
                top = torch.full(y.shape, float("-inf"), dtype=math_dtype, device=h.device)  # (n,) running max
                total = torch.zeros_like(top)  # (n,) sum exp(z - top)
                weighted = torch.zeros_like(top)  # (n,) sum exp(z - top) * z
                picked = torch.zeros_like(top)  # (n,) z at the target
                for v0 in range(0, vocab, block):
                    cols = slice(v0, v0 + block)
                    z = _tile_logits(h, w[cols], None if b is None else b[cols], temperature, math_dtype)  # (n, vb)
                    new_top = torch.maximum(top, z.amax(-1))  # (n,)
                    rescale = (top - new_top).exp()  # (n,) 0 on the first block
                    local = y - v0  # (n,) the target's column in this block, if it is inside
                    inside = (local >= 0) & (local < z.shape[1])  # (n,) (masks, not indices: no device sync)
                    at_target = z.gather(-1, local.clamp(0, z.shape[1] - 1).unsqueeze(-1)).squeeze(-1)  # (n,)
                    picked = torch.where(inside, at_target, picked)
                    shifted = z.sub_(new_top.unsqueeze(-1))  # (n, vb) in place: z - max
                    e = shifted.exp()  # (n, vb)
                    block_total = e.sum(-1)  # (n,)
                    if with_entropy:  # sum e (z' + max) = sum e z' + max * sum e
                        block_weighted = e.mul_(shifted).sum(-1) + new_top * block_total
                        weighted = weighted * rescale + block_weighted
                    total = total * rescale + block_total
                    top = new_top
                logz[rows] = top + total.log()
                logp[rows] = picked - logz[rows]
                if with_entropy:
                    entropy[rows] = logz[rows] - weighted / total
        ctx.save_for_backward(hidden, weight, bias, targets, logz, entropy)
        ctx.temperature, ctx.chunk_rows, ctx.block, ctx.mm_dtype = temperature, chunk_rows, block, mm_dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, logz, entropy = ctx.saved_tensors
        temperature, chunk_rows, block, mm_dtype = ctx.temperature, ctx.chunk_rows, ctx.block, ctx.mm_dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        none = (None,) * 8
        if grad_logp is None and grad_entropy is None:
            return none
        math_dtype = logz.dtype
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        grad_h = torch.zeros(hidden.shape, dtype=math_dtype, device=hidden.device) if need_h else None  # (N, H)
        grad_w = torch.zeros(weight.shape, dtype=math_dtype, device=weight.device) if need_w else None  # (V, H)
        grad_b = torch.zeros(bias.shape, dtype=math_dtype, device=bias.device) if need_b else None  # (V,)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(mm_dtype)  # (V, H)
            b = None if bias is None else bias.to(mm_dtype)
            for start in range(0, n_rows, chunk_rows):
                rows = slice(start, start + chunk_rows)
                h = hidden[rows]  # (n, H)
                h_math = h.to(math_dtype)
                y = targets[rows]  # (n,)
                g_logp = None if grad_logp is None else grad_logp[rows].to(math_dtype).unsqueeze(-1)  # (n, 1)
                g_ent = None if grad_entropy is None else grad_entropy[rows].to(math_dtype).unsqueeze(-1)  # (n, 1)
                for v0 in range(0, vocab, block):
                    cols = slice(v0, v0 + block)
                    z = _tile_logits(h, w[cols], None if b is None else b[cols], temperature, math_dtype)  # (n, vb)
                    log_probs = z.sub_(logz[rows].unsqueeze(-1))  # (n, vb) in place: log p_j
                    p = log_probs.exp()  # (n, vb)
                    if g_ent is not None:  # g_H * (-p_j (log p_j + H)), built in log_probs' memory
                        g = log_probs.add_(entropy[rows].unsqueeze(-1)).mul_(p).mul_(-g_ent)
                        if g_logp is not None:
                            g.addcmul_(p, g_logp, value=-1.0)
                    else:
                        del log_probs
                        g = p.mul_(-g_logp)
                    del p
                    if g_logp is not None:  # + g_logp at the target, for the targets inside this block
                        local = y - v0  # (n,)
                        inside = (local >= 0) & (local < g.shape[1])  # (n,)
                        g.scatter_add_(-1, local.clamp(0, g.shape[1] - 1).unsqueeze(-1), g_logp * inside.unsqueeze(-1))
                    if temperature != 1.0:
                        g.div_(temperature)  # (n, vb) gradient with respect to the raw logits
                    if need_h:
                        grad_h[rows] += g.to(mm_dtype) @ w[cols]
                    if need_w:
                        grad_w[cols].addmm_(g.t(), h_math)
                    if need_b:
                        grad_b[cols] += g.sum(0)
        return (None if grad_h is None else grad_h.to(hidden.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype)) + none[3:]


def _tile_logits(h, w, b, temperature, math_dtype):
    """(h W^T + b) / temperature for a tile of rows and vocabulary entries, in ``math_dtype``: ``(n, vb)``."""
    z = h.to(w.dtype) @ w.t() if b is None else torch.addmm(b, h.to(w.dtype), w.t())  # (n, vb)
    z = z.to(math_dtype)
    return z if temperature == 1.0 else z.div_(temperature)


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    with_entropy: bool = False,
    chunk_rows: int | None = None,
    vocab_block: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax((hidden W^T + b) / temperature)[target] without ever building the ``(..., V)`` logits.

    ``hidden`` ``(..., H)``: final hidden states (after the model's last norm); ``weight`` ``(V, H)`` and
    ``bias`` ``(V,)`` the LM head's; ``targets`` ``(...)`` integer token ids. Returns per-row log-probs
    ``(...)`` (and with ``with_entropy=True`` the entropy of the tempered distribution, ``(...)``) in
    float32 whatever the dtype of ``hidden`` (float64 for float64 input). ``mask`` ``(...)``: rows with
    mask 0 are not computed and give 0 (no gradient). ``chunk_rows``: rows per chunk (default
    ``CHUNK_ROWS``); ``vocab_block``: vocabulary entries per tile (default ``max(1, TILE_ELEMENTS //
    chunk_rows)``). Memory beyond the inputs and their gradients: about three tiles of float32 logits
    (24 MB by default) whatever ``N`` and ``V``. Time: one extra ``h W^T`` product (the backward
    recomputes the logits) against the naive computation.
    Gradients flow to ``hidden``, ``weight`` and ``bias``; they equal those of the naive
    ``log_softmax(linear(hidden, weight, bias).float() / temperature).gather(...)`` up to float rounding.
    """
    check_tensor("hidden", hidden, ndim=range(2, 5), finite=False)  # a finiteness scan of W would cost a pass
    check_tensor("weight", weight, ndim=2, finite=False)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(f"bias must be a tensor of shape ({weight.shape[0]},)")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError("targets must be an integer (int64 or int32) tensor")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    check_number("temperature", temperature, low=0.0, low_inclusive=False)
    chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
    check_number("chunk_rows", chunk_rows, low=1)
    vocab_block = max(1, TILE_ELEMENTS // chunk_rows) if vocab_block is None else vocab_block
    check_number("vocab_block", vocab_block, low=1)
    shape = targets.shape
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()  # (N, H), (N,)
    keep = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != shape:
            raise ValueError(f"mask must be a tensor of shape {tuple(shape)}")
        keep = mask.reshape(-1) != 0  # (N,)
        flat_h, flat_t = flat_h[keep], flat_t[keep]  # (n_real, H), (n_real,): padding costs nothing
    chunk_rows = max(1, min(int(chunk_rows), flat_h.shape[0]))
    logp, entropy = _HiddenLogprobs.apply(flat_h, weight, bias, flat_t, float(temperature), chunk_rows,
                                          int(vocab_block), with_entropy)

    def unflatten(x):
        if keep is None:
            return x.reshape(shape)
        return x.new_zeros(shape).masked_scatter(keep.reshape(shape), x)  # (...) 0 on masked rows

    if not with_entropy:
        return unflatten(logp)
    return unflatten(logp), unflatten(entropy)


# --------------------------------------------------------------------------------------------------
# From hidden states: TRPO's exact KL over the vocabulary and its Fisher product, one chunk of rows at a time
# --------------------------------------------------------------------------------------------------

SOFTMAX_CHUNK_ELEMENTS = 2**24
"""Logits per chunk of :func:`kl_from_hidden` and :func:`fisher_product_from_hidden`: rows are taken
``max(1, SOFTMAX_CHUNK_ELEMENTS // V)`` at a time (110 rows at V = 151,936: 64 MB of float32 logits)."""


def _check_head(name: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_tensor(name, hidden, ndim=2, finite=False)
    check_tensor("weight", weight, ndim=2, finite=False)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[1]}), got {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},)")


def _chunk_rows(n: int, vocab: int, chunk_rows: int | None) -> int:
    rows = max(1, SOFTMAX_CHUNK_ELEMENTS // vocab) if chunk_rows is None else chunk_rows
    check_number("chunk_rows", rows, low=1)
    return max(1, min(int(rows), n))


def kl_from_hidden(
    old_hidden: torch.Tensor,
    old_weight: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    old_bias: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Exact KL(p_old || p) over the whole vocabulary for each row, ``(N,)``, without ``(N, V)`` logits.

    ``p_old = softmax((old_hidden old_weight^T + old_bias) / temperature)`` and ``p`` likewise, for
    hidden states ``(N, H)`` and LM heads ``(V, H)``, ``(V,)``: the KL constraint of TRPO (Schulman et
    al. 2015, Eq. 12) at each response token. ``chunk_rows`` rows at a time (default: ``V`` times that
    under :data:`SOFTMAX_CHUNK_ELEMENTS`), in float32 (float64 for float64 input). Differentiable.
    """
    _check_head("old_hidden", old_hidden, old_weight, old_bias)
    _check_head("hidden", hidden, weight, bias)
    if old_hidden.shape[0] != hidden.shape[0] or old_weight.shape != weight.shape:
        raise ValueError(f"old and new must have the same shapes, got hidden {tuple(old_hidden.shape)} and "
                         f"{tuple(hidden.shape)}, weight {tuple(old_weight.shape)} and {tuple(weight.shape)}")
    check_number("temperature", temperature, low=0.0, low_inclusive=False)
    math_dtype = _math_dtype(hidden)
    rows = _chunk_rows(hidden.shape[0], weight.shape[0], chunk_rows)
    pieces = []
    for start in range(0, hidden.shape[0], rows):
        old = _tile_logits(old_hidden[start : start + rows], old_weight, old_bias, temperature, math_dtype)
        old = old.log_softmax(-1)  # (n, V)
        new = _tile_logits(hidden[start : start + rows], weight, bias, temperature, math_dtype).log_softmax(-1)
        pieces.append((old.exp() * (old - new)).sum(-1))  # (n,)
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=math_dtype)


@torch.no_grad()
def fisher_product_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    d_hidden: torch.Tensor,
    d_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    d_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The softmax head's share of a Fisher-vector product, ``J^T F J d``, without ``(N, V)`` logits.

    With logits ``z = (h W^T + b) / temperature`` per row and ``p = softmax(z)``, the Hessian of
    ``KL(p_old || p)`` in ``z`` at ``p = p_old`` is the Fisher matrix ``F = diag(p) - p p^T``. For a
    direction ``d = (d_hidden (N, H), d_weight (V, H), d_bias (V,))`` this returns the cotangents of
    ``F dz`` with ``dz = (d_hidden W^T + h d_weight^T + d_bias) / temperature``: ``(g_hidden (N, H),
    g_weight (V, H), g_bias (V,) or None)``, summed over rows. Back-propagating ``g_hidden`` through the
    network that made ``hidden`` and adding ``g_weight``, ``g_bias`` gives the Fisher-vector product of
    TRPO's conjugate gradient (Schulman et al. 2015, Appendix C). ``chunk_rows`` as in :func:`kl_from_hidden`.
    """
    _check_head("hidden", hidden, weight, bias)
    check_tensor("d_hidden", d_hidden, ndim=2, finite=False)
    check_tensor("d_weight", d_weight, ndim=2, finite=False)
    if d_hidden.shape != hidden.shape or d_weight.shape != weight.shape:
        raise ValueError(f"d_hidden and d_weight must have the shapes of hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)}, got {tuple(d_hidden.shape)} and {tuple(d_weight.shape)}")
    if (bias is None) != (d_bias is None) or (d_bias is not None and d_bias.shape != bias.shape):
        raise ValueError("d_bias must be given exactly when bias is, with its shape")
    check_number("temperature", temperature, low=0.0, low_inclusive=False)
    math_dtype = _math_dtype(hidden)
    rows = _chunk_rows(hidden.shape[0], weight.shape[0], chunk_rows)
    w, dw = weight.to(math_dtype), d_weight.to(math_dtype)
    g_hidden = torch.empty(hidden.shape, dtype=math_dtype, device=hidden.device)
    g_weight = torch.zeros_like(w)
    g_bias = None if bias is None else torch.zeros(bias.shape, dtype=math_dtype, device=bias.device)
    for start in range(0, hidden.shape[0], rows):
        h = hidden[start : start + rows].to(math_dtype)  # (n, H)
        p = _tile_logits(h, w, None if bias is None else bias.to(math_dtype), temperature, math_dtype).softmax(-1)
        dz = d_hidden[start : start + rows].to(math_dtype) @ w.t() + h @ dw.t()  # (n, V)
        if d_bias is not None:
            dz = dz + d_bias.to(math_dtype)
        dz = dz / temperature
        f_dz = p * (dz - (p * dz).sum(-1, keepdim=True)) / temperature  # (n, V) F dz, and the 1/T of z's Jacobian
        g_hidden[start : start + rows] = f_dz @ w
        g_weight += f_dz.t() @ h
        if g_bias is not None:
            g_bias += f_dz.sum(0)
    return g_hidden, g_weight, g_bias
