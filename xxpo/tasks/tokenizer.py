"""A character-level tokenizer that is a real ``transformers`` tokenizer.

Every character of :data:`ALPHABET` is one token, so ``"23+45="`` is six tokens and a model sees
the digits one by one. The tokenizer is built with the ``tokenizers`` library (a ``WordLevel`` model
over single characters, a ``Split`` pre-tokenizer that isolates every character, a ``Fuse`` decoder
that joins them back without spaces) and wrapped in ``transformers.PreTrainedTokenizerFast``, so it
survives ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any Hugging Face tokenizer.

Conventions:

- ids ``0..3`` are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; the characters follow in
  :data:`ALPHABET` order.
- Encoding with ``add_special_tokens=True`` (the default) puts ``<bos>`` in front; ``<eos>`` is never
  added by the tokenizer (the SFT code appends it to targets, generation stops on it).
- ``padding_side="left"``: prompts are left padded so that the last column is the last prompt token
  for every row, which is what batched generation needs.
- Unknown characters: the tokenizer itself maps them to ``<unk>`` (the Hugging Face convention, so
  ``tokenizer(text)`` never fails), but :func:`encode_prompts`, the entry point the engine uses,
  refuses any prompt that would contain ``<unk>`` with a ``ValueError`` naming the prompt and the
  characters, because a silent ``<unk>`` in a prompt is always a bug here.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
ALPHABET = "0123456789+-*=.|? "
"""Every character a task may write: digits, operators, ``=``, the scratch filler ``.``, the scratch
separator ``|``, ``?`` and space."""

MODEL_MAX_LENGTH = 64


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character tokenizer (deterministic: the vocabulary is fixed by :data:`ALPHABET`)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def render_prompts(tokenizer, prompts: list[str]) -> tuple[list[str], bool]:
    """The text the model reads for each prompt, and whether the tokenizer should add its special tokens.

    A tokenizer with a chat template (``tokenizer.chat_template``, e.g. a local Qwen2.5-Instruct
    directory) gets each prompt as one user message followed by the assistant's turn
    (``apply_chat_template(..., add_generation_prompt=True)``; the template supplies its own special
    tokens, so none are added). Without a template (the character tokenizer) the prompt is used as is
    and the tokenizer adds its special tokens (``<bos>``).
    """
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        return texts, False
    return list(prompts), True


def prompt_lengths(tokenizer, prompts: list[str]) -> list[int]:
    """Tokens :func:`encode_prompts` gives each prompt (chat template and special tokens included)."""
    texts, special = render_prompts(tokenizer, prompts)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts as ``<bos> + tokens`` (or through the tokenizer's chat template, see
    :func:`render_prompts`), left padded to the longest one.

    Returns ``input_ids`` (B, P) long and ``attention_mask`` (B, P) long (1 = real token). Works with
    any left-padding tokenizer; a prompt that would contain the unknown token raises ``ValueError``.
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError("prompts must be a non-empty list of str")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(prompt).__name__}")
    if tokenizer.padding_side != "left":
        raise ValueError(f"tokenizer.padding_side must be 'left' for prompts, got {tokenizer.padding_side!r}")
    texts, special = render_prompts(tokenizer, prompts)
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=special)
    input_ids, attention_mask = batch["input_ids"].long(), batch["attention_mask"].long()  # (B, P), (B, P)
    unknown_at = (input_ids == tokenizer.unk_token_id) & (attention_mask == 1) if tokenizer.unk_token_id is not None else None
    if unknown_at is not None and bool(unknown_at.any()):  # real tokens only: some tokenizers pad with their unk token
        i = int(unknown_at.any(-1).nonzero()[0])  # first offending prompt
        unknown = sorted(set(prompts[i]) - set(tokenizer.get_vocab()))
        raise ValueError(f"prompts[{i}] = {prompts[i]!r} has characters the tokenizer does not know: {unknown}")
    return input_ids, attention_mask
