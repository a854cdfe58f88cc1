"""Speed of xxpo.rollout.sample against transformers' model.generate on the same model and batch.

Both sample G responses per prompt with a KV cache, temperature 1 and no top-k / top-p, on the
"tiny" preset (or --model). EOS is suppressed in both (its logit is set to -inf by a logits bias) so
every row runs exactly --max-new-tokens steps and the two do the same amount of work. The two are
timed alternately, --repeats times each, after one warm-up call; the script prints the median wall
times and their ratio. A third line times the hand loop without a cache (every step re-reads the whole
prefix), to show what the cache buys.

    python benchmarks/sampling.py [--model tiny] [--prompts 16] [--group 8] [--max-new-tokens 16] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from xxpo.models import MODEL_PRESETS, build_model
from xxpo.rollout import sample
from xxpo.tasks import get_task, make_tokenizer
from xxpo.tasks.tokenizer import encode_prompts


class NoEos(torch.nn.Module):
    """The model with the EOS logit at -inf, so no row stops early (equal work for both samplers)."""

    def __init__(self, inner: torch.nn.Module, eos_token_id: int):
        super().__init__()
        self.inner, self.config, self.eos_token_id = inner, inner.config, eos_token_id

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits[..., self.eos_token_id] = float("-inf")
        return out


def no_cache_sample(model, prompt_ids, prompt_mask, num_samples, max_new_tokens, generator):
    """The same sampling with no KV cache: one full forward over prompt + generated tokens per step."""
    ids = prompt_ids.repeat_interleave(num_samples, dim=0)  # (B, P)
    mask = prompt_mask.repeat_interleave(num_samples, dim=0)  # (B, P)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, S)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]  # (B, V)
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
            ids = torch.cat([ids, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--task", default="add3")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = make_tokenizer()
    model = NoEos(build_model(MODEL_PRESETS[args.model], tokenizer, seed=0).eval(), tokenizer.eos_token_id)
    examples = get_task(args.task).split("test")[: args.prompts]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [ex.prompt for ex in examples])  # (N, P)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def ours():
        r = sample(model, prompt_ids, prompt_mask, num_samples=args.group, max_new_tokens=args.max_new_tokens,
                   eos_token_id=eos, pad_token_id=pad, generator=torch.Generator().manual_seed(0))
        return r.response_ids.shape

    def generate():
        with torch.no_grad():
            out = model.inner.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=args.group,
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,  # suppresses EOS like NoEos does
                eos_token_id=eos,
                pad_token_id=pad,
            )
        return (out.shape[0], out.shape[1] - prompt_ids.shape[1])

    def uncached():
        out = no_cache_sample(model, prompt_ids, prompt_mask, args.group, args.max_new_tokens,
                              torch.Generator().manual_seed(0))
        return (out.shape[0], out.shape[1] - prompt_ids.shape[1])

    runners = {"xxpo.rollout.sample": ours, "model.generate": generate, "hand loop, no cache": uncached}
    shapes = {name: tuple(run()) for name, run in runners.items()}  # warm-up, and equal work
    if len(set(shapes.values())) != 1:
        raise RuntimeError(f"the samplers did different work: {shapes}")
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    b = args.prompts * args.group
    print(f"model={args.model} batch={b} ({args.prompts} prompts x G={args.group}) new_tokens={args.max_new_tokens} "
          f"threads={args.threads} repeats={args.repeats}")
    for name, median in medians.items():
        print(f"  {name:22s} median {median * 1e3:8.1f} ms   ({b * args.max_new_tokens / median:8.0f} tokens/s)")
    base = medians["model.generate"]
    print(f"  ratio sample / generate          = {medians['xxpo.rollout.sample'] / base:.2f}")
    print(f"  ratio no-cache loop / generate   = {medians['hand loop, no cache'] / base:.2f}")


if __name__ == "__main__":
    main()
