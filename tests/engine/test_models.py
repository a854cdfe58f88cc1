"""Models: configs and presets, deterministic construction, MoE routing and Routing Replay, critics,
devices, save/load."""

import copy
import dataclasses
import inspect

import pytest
import torch
from transformers import PreTrainedModel

from xxpo.models import (
    MODEL_PRESETS,
    ModelConfig,
    PromptValueModel,
    ValueModel,
    build_model,
    count_parameters,
    load_model,
    position_ids_from_mask,
    replay_routing,
    resolve_device,
    routing_decisions,
    save_model,
)
from xxpo.rollout import response_logprobs, sample
from xxpo.tasks import encode_prompts


def batch(tok, prompts=("1+2=", "23+45=", "99*9=")):
    return encode_prompts(tok, list(prompts))


def expected_parameters(cfg: ModelConfig, vocab: int) -> int:
    """Parameter count written out from the Qwen2 / Qwen3-MoE architectures (tied embeddings)."""
    h, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    if cfg.arch == "dense":
        attention = (h * q + q) + 2 * (h * kv + kv) + q * h  # q/k/v carry biases in Qwen2
        mlp = 3 * h * cfg.intermediate_size
    else:
        attention = h * q + 2 * h * kv + q * h + 2 * hd  # no biases, q_norm and k_norm instead
        mlp = cfg.num_experts * h + cfg.num_experts * 3 * h * cfg.moe_intermediate_size
    return vocab * h + cfg.num_layers * (attention + mlp + 2 * h) + h


@pytest.mark.parametrize("preset", list(MODEL_PRESETS))
def test_presets_build_with_the_expected_size(tok, preset):
    cfg = MODEL_PRESETS[preset]
    model = build_model(cfg, tok, seed=0)
    assert isinstance(model, PreTrainedModel)
    assert count_parameters(model) == expected_parameters(cfg, len(tok))
    assert model.config.vocab_size == len(tok)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.max_position_embeddings == cfg.max_position_embeddings
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    if preset.startswith("tiny"):
        assert 100_000 <= count_parameters(model) <= 150_000


def test_model_config_validates_and_round_trips():
    cfg = MODEL_PRESETS["tiny-moe"]
    assert ModelConfig(**cfg.to_dict()) == cfg
    assert list(cfg.to_dict())[0] == "arch"
    bad = {
        "arch": "rnn",
        "hidden_size": 0,
        "num_kv_heads": 3,
        "num_heads": 5,
        "experts_per_token": 5,
        "moe_intermediate_size": 0,
        "intermediate_size": 64,
    }
    for field, value in bad.items():
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(cfg, **{field: value})
    with pytest.raises(ValueError, match="num_experts"):
        dataclasses.replace(MODEL_PRESETS["tiny"], num_experts=4)
    with pytest.raises(TypeError, match="hidden_size"):
        dataclasses.replace(cfg, hidden_size=64.0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_build_is_deterministic_in_the_seed_and_keeps_global_rng(tok, preset):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(MODEL_PRESETS[preset], tok, seed=7).state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    b = build_model(MODEL_PRESETS[preset], tok, seed=7).state_dict()
    c = build_model(MODEL_PRESETS[preset], tok, seed=8).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_build_model_rejects_bad_arguments(tok):
    with pytest.raises(TypeError, match="cfg"):
        build_model({"arch": "dense"}, tok, seed=0)
    with pytest.raises(ValueError, match="seed"):
        build_model(MODEL_PRESETS["tiny"], tok, seed=-1)


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_routing_decisions_shape_and_agreement_with_router_logits(tok, moe):
    ids, mask = batch(tok)
    routes = routing_decisions(moe, ids, mask)
    cfg = MODEL_PRESETS["tiny-moe"]
    assert routes.shape == (cfg.num_layers, *ids.shape, cfg.experts_per_token)
    assert routes.dtype == torch.long
    assert routes.min() >= 0 and routes.max() < cfg.num_experts
    assert (routes[..., 0] != routes[..., 1]).all()
    with torch.no_grad():
        positions = position_ids_from_mask(mask)
        out = moe(input_ids=ids, attention_mask=mask, position_ids=positions, output_router_logits=True)
    top = torch.stack([logits.topk(cfg.experts_per_token, dim=-1).indices for logits in out.router_logits])
    assert torch.equal(top.reshape(routes.shape).sort(-1).values, routes.sort(-1).values)


def test_routing_decisions_are_the_experts_the_model_uses(tok, moe):
    """Perturb one expert of the last layer: exactly the tokens routed to it change their logits."""
    ids, mask = batch(tok, ["12+34=", "5*6=", "77-7="])
    position_ids = position_ids_from_mask(mask)
    routes = routing_decisions(moe, ids, mask)[-1]  # (B, S, k)
    experts = moe.model.layers[-1].mlp.experts
    with torch.no_grad():
        before = moe(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        for expert in range(MODEL_PRESETS["tiny-moe"].num_experts):
            saved = experts.down_proj[expert].clone()
            experts.down_proj[expert] += 1.0
            after = moe(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
            experts.down_proj[expert] = saved
            changed = (after - before).abs().amax(-1) > 1e-6  # (B, S)
            routed = (routes == expert).any(-1)  # (B, S)
            assert torch.equal(changed[mask.bool()], routed[mask.bool()]), expert


def test_routing_decisions_rejects_dense_models(tok, dense):
    ids, mask = batch(tok)
    with pytest.raises(ValueError, match="model"):
        routing_decisions(dense, ids, mask)


# ------------------------------------------------------------------------------------ Routing Replay


def rerouted(moe, seed: int = 0, scale: float = 1.0):
    """A copy of ``moe`` whose router weights got a large random kick (the routing changes; nothing else)."""
    model = copy.deepcopy(moe)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight += torch.randn(layer.mlp.gate.weight.shape, generator=generator) * scale
    return model


def forward(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)


def experts_used(model, ids, mask) -> torch.Tensor:
    """The top-k indices each layer's expert module RECEIVED during one forward, (L, B, S, k)."""
    seen = []
    handles = [layer.mlp.experts.register_forward_pre_hook(lambda _m, args: seen.append(args[1].clone()))
               for layer in model.model.layers]
    try:
        with torch.no_grad():
            forward(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([x.reshape(*ids.shape, -1) for x in seen])


@pytest.fixture(scope="module")
def moe_rollout(tok, moe):
    ids, mask = batch(tok, ["12+34=", "5+6=", "99*9="])
    return sample(moe, ids, mask, num_samples=3, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))


def test_replay_of_the_models_own_routing_changes_nothing(tok, moe, moe_rollout):
    r = moe_rollout
    hooks_before = [len(layer.mlp.gate._forward_hooks) for layer in moe.model.layers]
    own = routing_decisions(moe, r.input_ids, r.attention_mask)
    with torch.no_grad():
        plain = forward(moe, r.input_ids, r.attention_mask).logits
        with replay_routing(moe, own):
            replayed = forward(moe, r.input_ids, r.attention_mask).logits
        logp = response_logprobs(moe, r)  # the usual (shared-prompt) training forward
        logp_replayed = response_logprobs(moe, r, routing=own)
    assert torch.equal(replayed, plain)  # the same gate arithmetic as the router's own: bit for bit
    torch.testing.assert_close(logp_replayed, logp, atol=1e-6, rtol=0)
    torch.testing.assert_close(logp_replayed, r.behav_logp, atol=1e-5, rtol=0)
    assert [len(layer.mlp.gate._forward_hooks) for layer in moe.model.layers] == hooks_before  # hooks removed


def test_replay_forces_the_behaviour_experts_after_the_router_changed(tok, moe, moe_rollout):
    r = moe_rollout
    ids, mask = r.input_ids, r.attention_mask
    behaviour = routing_decisions(moe, ids, mask)  # (L, B, S, k)
    current = rerouted(moe)
    real = mask.bool()
    own = routing_decisions(current, ids, mask)
    changed = (own.sort(-1).values != behaviour.sort(-1).values).any(-1)[:, real]  # (L, real tokens)
    assert changed.float().mean() > 0.2  # the kick really re-routed many tokens
    assert torch.equal(experts_used(current, ids, mask), own)  # without replay: the current router's choice
    with replay_routing(current, behaviour):
        assert torch.equal(experts_used(current, ids, mask), behaviour)
        assert torch.equal(routing_decisions(current, ids, mask), behaviour)
        with torch.no_grad():
            replayed = forward(current, ids, mask).logits
    with torch.no_grad():
        plain = forward(current, ids, mask).logits
    assert (replayed - plain)[real].abs().amax() > 1e-3  # the replay changed the output


def swiglu_expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ experts.gate_up_proj[e].double().T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].double().T


def test_replayed_layer_output_matches_a_hand_computed_mixture(tok, moe, moe_rollout):
    """Layer 0 under replay = sum over the REPLAYED experts of (current router prob / their sum) * expert(x)."""
    r = moe_rollout
    ids, mask = r.input_ids, r.attention_mask
    behaviour = routing_decisions(moe, ids, mask)
    current = rerouted(moe, seed=1)
    block = current.model.layers[0].mlp
    captured = {}
    handle = block.register_forward_hook(lambda _m, args, out: captured.update(x=args[0].detach(), y=out.detach()))
    try:
        with replay_routing(current, behaviour), torch.no_grad():
            forward(current, ids, mask)
    finally:
        handle.remove()
    x = captured["x"].reshape(-1, captured["x"].shape[-1]).double()  # (N, H)
    chosen = behaviour[0].reshape(x.shape[0], -1)  # (N, k)
    probs = torch.softmax(x @ block.gate.weight.detach().double().T, dim=-1)  # (N, E) the current router
    expected = torch.zeros_like(x)
    for n in range(x.shape[0]):
        w = probs[n, chosen[n]] / probs[n, chosen[n]].sum()  # norm_topk_prob=True
        for j, e in enumerate(chosen[n].tolist()):
            expected[n] += w[j] * swiglu_expert(block.experts, e, x[n : n + 1])[0].detach()
    torch.testing.assert_close(captured["y"].reshape(expected.shape).double(), expected, atol=1e-5, rtol=1e-4)


def router_grads(model) -> list[torch.Tensor]:
    return [layer.mlp.gate.weight.grad.clone() for layer in model.model.layers]


def test_gradients_reach_the_router_under_replay(tok, moe, moe_rollout):
    r = moe_rollout
    behaviour = routing_decisions(moe, r.input_ids, r.attention_mask)
    current = rerouted(moe)
    current.zero_grad(set_to_none=True)
    response_logprobs(current, r, routing=behaviour).sum().backward()
    for grad in router_grads(current):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # with the model's own routing, replay gives the same gradients as the usual forward
    own = routing_decisions(moe, r.input_ids, r.attention_mask)
    model = copy.deepcopy(moe)
    model.zero_grad(set_to_none=True)
    response_logprobs(model, r, routing=own).sum().backward()
    replayed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    response_logprobs(model, r).sum().backward()
    for a, b in zip(replayed, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_replay_routing_rejects_dense_models_and_bad_decisions(tok, dense, moe, moe_rollout):
    r = moe_rollout
    ids, mask = r.input_ids, r.attention_mask
    good = routing_decisions(moe, ids, mask)  # (L, B, S, k)
    hooks_before = len(moe.model.layers[0].mlp.gate._forward_hooks)
    with pytest.raises(ValueError, match="MoE"):
        with replay_routing(dense, good):
            pass
    with pytest.raises(ValueError, match="MoE"):
        response_logprobs(dense, r, routing=good)
    bad_shapes = [good[:1], good[..., :1], good[0], torch.cat([good, good], dim=-1)]
    for bad in bad_shapes:
        with pytest.raises(ValueError, match="decisions must have shape"):
            with replay_routing(moe, bad):
                pass
    with pytest.raises(TypeError, match="decisions"):
        with replay_routing(moe, good.float()):
            pass
    with pytest.raises(ValueError, match="expert indices"):
        with replay_routing(moe, good + MODEL_PRESETS["tiny-moe"].num_experts):
            pass
    with pytest.raises(ValueError, match="distinct"):
        with replay_routing(moe, good[..., :1].expand_as(good).contiguous()):
            pass
    # the right shape for another batch: the forward's token count does not match
    with pytest.raises(ValueError, match="B \\* S"):
        with replay_routing(moe, good[:, :2]), torch.no_grad():
            forward(moe, ids, mask)
    assert len(moe.model.layers[0].mlp.gate._forward_hooks) == hooks_before  # removed even after the error
    # response_logprobs checks the (B, P+T) layout against the rollout
    with pytest.raises(ValueError, match="routing"):
        response_logprobs(moe, r, routing=good[:, :, :-1])
    with pytest.raises(ValueError, match="routing"):
        response_logprobs(moe, r.select(slice(0, 2)), routing=good)


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_value_model_copies_the_backbone_and_outputs_one_value_per_position(tok, dense, moe, arch):
    policy = dense if arch == "dense" else moe
    critic = ValueModel.from_policy(policy)
    for name, tensor in policy.base_model.state_dict().items():
        assert torch.equal(critic.backbone.state_dict()[name], tensor)
        assert critic.backbone.state_dict()[name].data_ptr() != tensor.data_ptr()
    ids, mask = batch(tok)
    values = critic(ids, mask)
    assert values.shape == ids.shape and values.dtype == torch.float32
    with torch.no_grad():
        hidden = policy.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        expected = hidden.last_hidden_state @ critic.head.weight[0] + critic.head.bias
    torch.testing.assert_close(values.detach(), expected)


def test_value_model_ignores_left_padding(tok, dense):
    critic = ValueModel.from_policy(dense)
    ids, mask = batch(tok, ["1+2=", "23+45="])
    alone_ids, alone_mask = batch(tok, ["1+2="])
    with torch.no_grad():
        padded = critic(ids, mask)[0, mask[0].bool()]
        alone = critic(alone_ids, alone_mask)[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_value_model_gradients_reach_head_and_backbone(tok, dense):
    critic = ValueModel.from_policy(dense)
    ids, mask = batch(tok)
    critic(ids, mask).pow(2).sum().backward()
    assert critic.head.weight.grad.abs().sum() > 0
    assert critic.backbone.embed_tokens.weight.grad.abs().sum() > 0
    assert critic.backbone.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in dense.parameters())  # the policy is untouched


def test_prompt_value_model_reads_only_the_last_prompt_token(tok, dense):
    critic = PromptValueModel.from_policy(dense)
    assert list(inspect.signature(critic.forward).parameters) == ["prompt_ids", "prompt_mask"]
    ids, mask = batch(tok, ["1+2=", "23+45=", "7*7="])
    logits = critic(ids, mask)
    assert logits.shape == (3,) and logits.dtype == torch.float32
    with torch.no_grad():
        alone = torch.cat([critic(*batch(tok, [p])) for p in ["1+2=", "23+45=", "7*7="]])
        full = critic.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        expected = full.last_hidden_state[:, -1] @ critic.head.weight[0] + critic.head.bias
    torch.testing.assert_close(logits.detach(), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.detach(), expected)
    logits.sum().backward()
    assert critic.head.weight.grad.abs().sum() > 0
    assert critic.backbone.layers[-1].mlp.up_proj.weight.grad.abs().sum() > 0


def test_prompt_value_model_rejects_right_padding(tok, dense):
    critic = PromptValueModel.from_policy(dense)
    ids, mask = batch(tok, ["1+2=", "23+45="])
    with pytest.raises(ValueError, match="prompt_mask"):
        critic(ids.flip(-1), mask.flip(-1))


def test_critic_head_init_is_seeded(dense):
    a, b, c = (PromptValueModel.from_policy(dense, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_resolve_device():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu0", "tpu", "meta"):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            resolve_device("cuda")
    with pytest.raises(TypeError, match="device"):
        resolve_device(0)


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_save_and_load_round_trip(tok, dense, moe, arch, tmp_path):
    model = dense if arch == "dense" else moe
    save_model(model, tok, tmp_path)
    loaded, loaded_tok = load_model(tmp_path, device="cpu")
    assert type(loaded) is type(model) and not loaded.training
    assert loaded_tok.get_vocab() == tok.get_vocab() and loaded_tok.padding_side == "left"
    ids, mask = encode_prompts(loaded_tok, ["1+2=", "23+45="])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        got = loaded(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    torch.testing.assert_close(got, expected)


def test_load_model_needs_a_local_model_directory(tmp_path):
    with pytest.raises(ValueError, match="path"):
        load_model(tmp_path / "missing")
