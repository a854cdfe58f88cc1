"""The character tokenizer: vocabulary, round trips, save/load, prompt encoding."""

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from xxpo.tasks import ALPHABET, encode_prompts, get_task, make_tokenizer


def test_is_a_fast_transformers_tokenizer_with_special_tokens(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 4 + len(ALPHABET)
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    assert len(ids) == 4 and None not in ids
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert tok.padding_side == "left"


def test_one_token_per_character_and_bos_in_front(tok):
    text = "23+45=..|68"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids[1:] == [tok.convert_tokens_to_ids(c) for c in text]
    assert len(set(tok.convert_tokens_to_ids(list(ALPHABET)))) == len(ALPHABET)


def test_round_trip_every_character_including_space(tok):
    text = ALPHABET + ALPHABET[::-1]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_decode_skips_special_tokens(tok):
    ids = [tok.bos_token_id] + tok("12", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "12"


def test_every_task_text_is_in_the_alphabet(tok):
    import random

    rng = random.Random(0)
    for name in ("add2", "sub2", "mul1", "add2_scratch"):
        task = get_task(name)
        for ex in task.split("test")[:50]:
            target = task.sft_target(ex, rng)
            assert tok.decode(tok(ex.prompt + target, add_special_tokens=False)["input_ids"]) == ex.prompt + target
            assert tok.unk_token_id not in tok(ex.prompt + target)["input_ids"]


def test_save_and_auto_load_is_identical(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.padding_side == "left"
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    text = "7*8= |56"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    a = encode_prompts(tok, ["1+2=", "10+20="])
    b = encode_prompts(loaded, ["1+2=", "10+20="])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_unknown_character_maps_to_unk_but_encode_prompts_refuses_it(tok):
    assert tok("1a")["input_ids"][-1] == tok.unk_token_id
    with pytest.raises(ValueError, match=r"prompts\[1\].*'x'"):
        encode_prompts(tok, ["1+2=", "1x2="])


def test_encode_prompts_left_pads(tok):
    prompts = ["1+2=", "23+45=", "0+0="]
    ids, mask = encode_prompts(tok, prompts)
    assert ids.shape == mask.shape == (3, 1 + max(map(len, prompts)))
    assert ids.dtype == mask.dtype == torch.long
    for row, prompt in enumerate(prompts):
        n_pad = ids.shape[1] - 1 - len(prompt)
        assert mask[row].tolist() == [0] * n_pad + [1] * (len(prompt) + 1)
        assert ids[row, :n_pad].tolist() == [tok.pad_token_id] * n_pad
        assert ids[row, n_pad].item() == tok.bos_token_id
        assert ids[row, n_pad + 1 :].tolist() == [tok.convert_tokens_to_ids(c) for c in prompt]


def test_encode_prompts_rejects_bad_arguments(tok):
    with pytest.raises(TypeError, match="prompts"):
        encode_prompts(tok, "1+2=")
    with pytest.raises(TypeError, match="prompts"):
        encode_prompts(tok, [])
    right = make_tokenizer()
    right.padding_side = "right"
    with pytest.raises(ValueError, match="padding_side"):
        encode_prompts(right, ["1+2="])
