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
- Unknown characters: the raw tokenizer maps them to ``<unk>`` (the Hugging Face convention), but
  :func:`encode_prompts`, the entry point the engine uses, refuses them with a ``ValueError`` that
  names the character, because a silent ``<unk>`` in a prompt is always a bug here.
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


def check_text(name: str, text: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``text`` has a character outside :data:`ALPHABET`."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    unknown = sorted(set(text) - set(ALPHABET))
    if unknown:
        raise ValueError(f"{name} contains characters outside the tokenizer alphabet {ALPHABET!r}: {unknown}")


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts as ``<bos> + characters``, left padded to the longest one.

    Returns ``input_ids`` (B, P) long and ``attention_mask`` (B, P) long (1 = real token).
    Works with any tokenizer whose ``padding_side`` is ``"left"``; the alphabet check applies only to
    this package's character tokenizer (a loaded Hugging Face tokenizer has its own vocabulary).
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError("prompts must be a non-empty list of str")
    if tokenizer.padding_side != "left":
        raise ValueError(f"tokenizer.padding_side must be 'left' for prompts, got {tokenizer.padding_side!r}")
    character_level = tokenizer.unk_token == UNK and len(tokenizer) == len(SPECIAL_TOKENS) + len(ALPHABET)
    for i, prompt in enumerate(prompts):
        if character_level:
            check_text(f"prompts[{i}]", prompt)
        elif not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(prompt).__name__}")
    batch = tokenizer(list(prompts), padding=True, return_tensors="pt", add_special_tokens=True)
    return batch["input_ids"].long(), batch["attention_mask"].long()  # (B, P), (B, P)
