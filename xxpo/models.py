"""Tiny causal language models, value heads, and loading of local Hugging Face checkpoints.

The policies are ordinary ``transformers`` models built from a config, so everything the engine does
with them (KV-cache sampling, ``save_pretrained``, swapping in a real checkpoint) is the standard API:

- ``arch="dense"``: ``Qwen2ForCausalLM`` (grouped-query attention with RoPE, SwiGLU MLP, RMSNorm).
- ``arch="moe"``: ``Qwen3MoeForCausalLM``: every layer's MLP is a mixture of experts with a softmax
  router that sends each token to its top-``experts_per_token`` experts. :func:`routing_decisions`
  reports those choices: GSPO (arXiv 2507.18071) observes that after a gradient update about 10% of
  the experts activated for the same rollout change, which makes token-level importance ratios volatile.
  :func:`replay_routing` is the paper's remedy for GRPO on MoE models, "Routing Replay": a forward
  that reuses given expert choices (the behaviour policy's) while the gate weights stay differentiable.

Both tie the input embedding to the output layer and use a short context (the tasks need < 40 tokens).

The critics for PPO (arXiv 1707.06347) and sequence-level PPO (arXiv 2604.08865) share one recipe:
copy the policy's backbone (weights included) and put a scalar linear head on its last hidden states.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

ARCHS = ("dense", "moe")
ATTN_IMPLEMENTATION = "sdpa"
"""Attention kernel of the built models. Measured on 2 CPU cores, forward + backward of a left-padded
64 x 20 batch (median of 25): "tiny" 15.0 ms with SDPA vs 16.2 ms eager, "tiny-moe" 18.9 vs 18.8 ms;
logits agree to 4e-7. SDPA is faster for the dense model and on par for the MoE, so it is the choice."""

EXPERTS_IMPLEMENTATION = "eager"
"""Expert kernel of built MoE models: a loop over the experts that received tokens. As fast as the
default "grouped_mm" for the tiny preset (19 ms forward + backward, 20 ms per 8-token ``generate``) but
without its ~1 s warm-up on the first calls."""

ROUTER_TYPES = (Qwen3MoeTopKRouter, MixtralTopKRouter)
"""Router modules whose forward returns ``(router_logits, top_k_weights, top_k_indices)``; the indices
are exactly what the expert layer uses, so :func:`routing_decisions` records them with a hook."""


@dataclass
class ModelConfig:
    """Size of a model built from scratch by :func:`build_model`. Vocabulary comes from the tokenizer."""

    arch: str = "dense"
    """``"dense"`` (Qwen2) or ``"moe"`` (Qwen3-MoE: every layer's MLP is a mixture of experts)."""
    hidden_size: int = 64
    """Width of the residual stream; must be a multiple of ``num_heads`` with an even head size."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Query heads per attention layer."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide ``num_heads``."""
    intermediate_size: int = 256
    """Width of the SwiGLU MLP of a dense model; must be 0 for ``"moe"`` (its MLPs are the experts)."""
    num_experts: int = 0
    """Experts per MoE layer (>= 2 for ``"moe"``; must be 0 for ``"dense"``)."""
    experts_per_token: int = 0
    """Experts each token is routed to, the router's top-k (1..num_experts for ``"moe"``; 0 for dense)."""
    moe_intermediate_size: int = 0
    """Width of each expert's SwiGLU MLP (>= 1 for ``"moe"``; 0 for dense)."""
    max_position_embeddings: int = 64
    """Longest sequence (prompt + response) the RoPE tables are sized for."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "arch" and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{field.name} must be an int, got {type(value).__name__}")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"hidden_size must be a multiple of num_heads with an even head size, got {self.hidden_size} "
                f"and {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads={self.num_heads}, got {self.num_kv_heads}")
        if self.arch == "dense":
            if self.intermediate_size < 1:
                raise ValueError(f"intermediate_size must be >= 1 for arch='dense', got {self.intermediate_size}")
            for name in ("num_experts", "experts_per_token", "moe_intermediate_size"):
                if getattr(self, name) != 0:
                    raise ValueError(f"{name} must be 0 for arch='dense', got {getattr(self, name)}")
        else:
            if self.intermediate_size != 0:
                raise ValueError(f"intermediate_size must be 0 for arch='moe', got {self.intermediate_size}")
            if self.num_experts < 2:
                raise ValueError(f"num_experts must be >= 2 for arch='moe', got {self.num_experts}")
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise ValueError(
                    f"experts_per_token must be in [1, num_experts={self.num_experts}], got {self.experts_per_token}"
                )
            if self.moe_intermediate_size < 1:
                raise ValueError(f"moe_intermediate_size must be >= 1 for arch='moe', got {self.moe_intermediate_size}")

    def to_dict(self) -> dict:
        """Plain dict of every field (stable order), for run records and cache keys."""
        return dataclasses.asdict(self)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # ~125k parameters: learns 2-digit addition on 2 CPU cores in under a minute.
    "tiny": ModelConfig(arch="dense", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256),
    # Same attention and about the same parameter count, with 4 experts of width 64 and top-2 routing.
    "tiny-moe": ModelConfig(
        arch="moe",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=0,
        num_experts=4,
        experts_per_token=2,
        moe_intermediate_size=64,
    ),
    # ~1M parameters: for longer runs and the GPU profile.
    "small": ModelConfig(
        arch="dense", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512
    ),
}


def build_model(cfg: ModelConfig, tokenizer, seed: int) -> PreTrainedModel:
    """A freshly initialised causal LM of size ``cfg`` for ``tokenizer``'s vocabulary, float32 on CPU.

    Initialisation draws from a private RNG seeded with ``seed`` (the global torch RNG is left as it
    was), so the same ``cfg`` and ``seed`` give bit-identical weights.
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tokenizer, name, None) is None:
            raise ValueError(f"tokenizer must define {name}")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if cfg.arch == "dense":
        config = Qwen2Config(intermediate_size=cfg.intermediate_size, **common)
        model_class = Qwen2ForCausalLM
    else:
        config = Qwen3MoeConfig(
            intermediate_size=cfg.moe_intermediate_size,  # unused: every layer is sparse
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_token,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=True,
            **common,
        )
        model_class = Qwen3MoeForCausalLM
    config._attn_implementation = ATTN_IMPLEMENTATION
    if cfg.arch == "moe":
        config._experts_implementation = EXPERTS_IMPLEMENTATION
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, 2, ... counted over real tokens only, so left padding does not shift RoPE.

    ``attention_mask`` (B, S) of 0/1 -> long (B, S); padded positions get 0 (they are masked anyway).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)


def _check_batch(ids_name: str, input_ids, mask_name: str, attention_mask) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long or input_ids.dim() != 2:
        raise TypeError(f"{ids_name} must be a (B, S) long tensor")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"{mask_name} must be a tensor of shape {tuple(input_ids.shape)}")


def _routers(model: nn.Module) -> list[nn.Module]:
    """The model's MoE routers in layer order (the order of ``model.modules()``); ``ValueError`` if none."""
    routers = [m for m in model.modules() if isinstance(m, ROUTER_TYPES)]
    if not routers:
        names = [r.__name__ for r in ROUTER_TYPES]
        raise ValueError(f"model must be an MoE model with a router in {names}, got {type(model).__name__}")
    return routers


def routing_decisions(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Top-k expert indices chosen by every MoE layer for every token: long (L, B, S, k).

    A forward hook on each router records the indices it hands to the experts, i.e. the routing the
    model really used (not a recomputation); inside :func:`replay_routing` these are the replayed ones.
    The forward is the plain one-pass forward over ``(B, S)`` (position ids from the mask, no cache).
    Padded positions are included; mask them with ``attention_mask``. Raises ``ValueError`` for a
    model without a supported router (dense models).
    """
    _check_batch("input_ids", input_ids, "attention_mask", attention_mask)
    routers = _routers(model)
    batch, seq = input_ids.shape
    recorded: list[torch.Tensor] = []
    handles = [r.register_forward_hook(lambda _m, _inp, out: recorded.append(out[2].detach())) for r in routers]
    try:
        with torch.no_grad():
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            )
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([idx.reshape(batch, seq, -1) for idx in recorded]).long()  # (L, B, S, k)


def _replayed_gate_weights(router: nn.Module, router_logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The gate weights ``router`` would give experts ``indices`` (N, k), from its current ``router_logits`` (N, E).

    The same arithmetic as the router's own forward, with the top-k indices given instead of computed:
    softmax over all experts in float32, the chosen experts' probabilities, renormalised over the k
    chosen when the router renormalises (Qwen3-MoE: ``norm_topk_prob``; Mixtral: always).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # (N, E)
    weights = probs.gather(-1, indices)  # (N, k)
    if isinstance(router, Qwen3MoeTopKRouter):
        if router.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(router_logits.dtype)  # (N, k)
    return weights / weights.sum(dim=-1, keepdim=True)  # (N, k) Mixtral: renormalised, kept in float32


@contextlib.contextmanager
def replay_routing(model: PreTrainedModel, decisions: torch.Tensor):
    """Routing Replay (GSPO, arXiv 2507.18071, Sec. 5.3): inside the ``with`` block, every MoE layer of
    ``model`` sends each token to the experts in ``decisions`` instead of its router's own top-k.

    ``decisions``: long ``(L, B, S, k)``, as returned by :func:`routing_decisions` (one entry per MoE
    layer in ``model.modules()`` order, ``k`` = the router's top-k, distinct experts per token). The GSPO
    paper caches the experts the old (behaviour) policy activated for each token of a rollout and
    replays them when the updated policy computes its importance ratios, so that numerator and
    denominator are evaluated under the same routing.

    Only the expert CHOICE is replayed. The gate weights are the CURRENT router's softmax probabilities
    of the replayed experts, renormalised over the k of them exactly as the model's router renormalises
    its own top-k (:func:`_replayed_gate_weights`), so the loss still reaches the router weights through
    the gates (top-k selection itself has no gradient in either case). With the model's own decisions
    the forward is unchanged (same values, same gradients).

    Every forward inside the block must route ``B * S`` tokens per layer in the decisions' layout: a
    plain one-pass forward over the same ``(B, S)`` batch (:func:`routing_decisions`'s layout; in the
    engine, :func:`xxpo.rollout.response_logprobs` with ``routing=``). A forward with another token
    count (a cached decoding step, the shared-prompt training forward, another batch) raises
    ``ValueError``; the layout itself (which row is which) is the caller's responsibility.

    Raises ``ValueError`` for a model without a supported MoE router (dense models) and for decisions
    of the wrong type, shape or range.
    """
    routers = _routers(model)
    if not isinstance(decisions, torch.Tensor) or decisions.dtype != torch.long:
        raise TypeError(f"decisions must be a long tensor (L, B, S, k), got {type(decisions).__name__}"
                        + (f" of dtype {decisions.dtype}" if isinstance(decisions, torch.Tensor) else ""))
    top_k, num_experts = routers[0].top_k, routers[0].num_experts
    if decisions.dim() != 4 or decisions.shape[0] != len(routers) or decisions.shape[-1] != top_k:
        raise ValueError(
            f"decisions must have shape (L={len(routers)}, B, S, k={top_k}) for this model, got {tuple(decisions.shape)}"
        )
    if decisions.numel() and (int(decisions.min()) < 0 or int(decisions.max()) >= num_experts):
        raise ValueError(f"decisions must hold expert indices in [0, {num_experts}), got values in "
                         f"[{int(decisions.min())}, {int(decisions.max())}]")
    if top_k > 1 and bool((decisions.sort(-1).values.diff(dim=-1) == 0).any()):
        raise ValueError("decisions must name k distinct experts for every token (a router never repeats one)")
    n_tokens = decisions.shape[1] * decisions.shape[2]

    def make_hook(layer: int, indices: torch.Tensor):
        def hook(router, _inputs, output):
            router_logits = output[0]  # (N, E)
            if router_logits.shape[0] != n_tokens:
                raise ValueError(
                    f"replay_routing: MoE layer {layer} routes {router_logits.shape[0]} tokens but decisions hold "
                    f"B * S = {n_tokens}; run one plain forward over the (B, S) batch the decisions were recorded on"
                )
            idx = indices.to(router_logits.device)  # (N, k)
            return router_logits, _replayed_gate_weights(router, router_logits, idx), idx

        return hook

    handles = [
        router.register_forward_hook(make_hook(layer, decisions[layer].reshape(n_tokens, top_k)))
        for layer, router in enumerate(routers)
    ]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


class _CriticWithBackbone(nn.Module):
    """A copy of a causal LM's backbone with a scalar linear head on its last hidden states."""

    def __init__(self, backbone: nn.Module, hidden_size: int, seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            # Small weights: the initial value is ~0 (V = 0.5 for the sigmoid critic) yet the
            # backbone still receives gradient from the first step.
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) * 0.01)
            self.head.bias.zero_()

    @classmethod
    def from_policy(cls, policy: PreTrainedModel, seed: int = 0):
        """Critic whose backbone starts as a copy of ``policy``'s (the policy is not shared or changed)."""
        if not isinstance(policy, PreTrainedModel):
            raise TypeError(f"policy must be a transformers PreTrainedModel, got {type(policy).__name__}")
        backbone = copy.deepcopy(policy.base_model)
        critic = cls(backbone, policy.config.get_text_config().hidden_size, seed=seed)
        return critic.to(next(policy.parameters()).device)

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state  # (B, S, H)


class ValueModel(_CriticWithBackbone):
    """PPO's token-level critic V(s_t): one value per position (arXiv 1707.06347, Eq. 9; GAE 1506.02438)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids``, ``attention_mask`` (B, S) -> values (B, S) float32 (value after reading token t)."""
        _check_batch("input_ids", input_ids, "attention_mask", attention_mask)
        return self.head(self._hidden(input_ids, attention_mask)).squeeze(-1).float()  # (B, S)


class PromptValueModel(_CriticWithBackbone):
    """Sequence-level PPO's prompt-only critic (arXiv 2604.08865): V(x) = sigmoid(logit) = P(prompt solved).

    It reads the prompt and nothing else (its forward has no response argument), so the value cannot
    depend on the sampled response.
    """

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """LEFT-padded ``prompt_ids``, ``prompt_mask`` (B, P) -> logits (B,) float32 at the last prompt token."""
        _check_batch("prompt_ids", prompt_ids, "prompt_mask", prompt_mask)
        if not bool((prompt_mask[:, -1] == 1).all()):
            raise ValueError("prompt_mask must be left padded: the last column must be 1 for every row")
        return self.head(self._hidden(prompt_ids, prompt_mask)[:, -1]).squeeze(-1).float()  # (B,)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise the named device, which must exist."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a str, got {type(device).__name__}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return resolved


def save_model(model: PreTrainedModel, tokenizer, path: str | os.PathLike) -> None:
    """Write ``model`` and ``tokenizer`` to the directory ``path`` in Hugging Face format."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


PRECISIONS = ("fp32", "bf16-autocast")


def training_precision(device: torch.device) -> str:
    """How a local Hugging Face model is trained on ``device``: ``"bf16-autocast"`` on a CUDA device that
    supports bfloat16, else ``"fp32"``.

    ``"bf16-autocast"`` is mixed precision: the weights, gradients and AdamW moments stay float32 and the
    forward passes (sampling, training, reference, evaluation) run under
    ``torch.autocast("cuda", dtype=torch.bfloat16)``, so matrix products run in bfloat16 while
    log-softmax and the losses stay float32. Weights stored in bfloat16 would not train at the learning
    rates of the GPU profiles: bfloat16 keeps 8 significant bits, so an AdamW step of ~1e-6 on a weight of
    ~1e-2, a relative change of 1e-4, is far under half the spacing of bfloat16 numbers (2^-9 to 2^-8 of
    the value) and rounds back to the old weight. The
    built-in tiny models always train in float32 (their records were made that way).
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-autocast"
    return "fp32"


def precision_context(precision: str, device: torch.device):
    """The context manager that applies ``precision`` (one of :data:`PRECISIONS`) to forwards on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16-autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def context_length(model: PreTrainedModel) -> int | None:
    """The longest sequence (prompt + response) ``model``'s config declares (``max_position_embeddings``)."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def load_model(path: str | os.PathLike, device: str = "auto") -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer from a local Hugging Face directory (never the network).

    The model is returned in eval mode on ``resolve_device(device)``, in float32 whatever dtype the
    checkpoint was saved in (a bfloat16 checkpoint such as Qwen2.5's is upcast; on CUDA the trainer
    adds bfloat16 autocast, see :func:`training_precision`). The tokenizer is the directory's own,
    switched to left padding (the engine left-pads prompts); a tokenizer without a pad token gets its
    EOS token as pad, the usual choice for causal LMs. If it has a chat template,
    :func:`xxpo.tasks.encode_prompts` applies it to every prompt. Generation stops at the tokenizer's
    EOS token (``<|im_end|>`` for Qwen2.5-Instruct and Qwen3).
    """
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"path must be a local model directory containing config.json, got {path!r}")
    target = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).to(target).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
