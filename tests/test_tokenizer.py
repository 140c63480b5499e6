"""Our ``tokenize`` against the two reference tokenizers SD uses.

SD1 (ldm FrozenCLIPEmbedder): transformers' ``CLIPTokenizer`` with padding="max_length", max_length=77,
truncation=True, pad = end-of-text, built offline from open_clip's copy of the OpenAI BPE vocabulary (the
``hf_clip_tokenizer`` fixture: ``oracles.clip_tokenizer``). SD2 (FrozenOpenCLIPEmbedder): ``open_clip.tokenize``
(pad 0).
"""
from __future__ import annotations

import open_clip  # heavy import at collection, not inside the first test's timing
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from diffedit.models import preset, tokenize
from diffedit.models.text import EOT, SOT

LONG = " ".join(["a very long prompt about a red fox jumping over the lazy brown dog"] * 8)  # > 77 tokens
PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "a bowl of fruit, with apples; pears... and (one) banana!?",
    "an astronaut riding a horse on the moon, 4k, trending on artstation",
    "it's a dog's life -- isn't it?",
    "   extra   spaces\tand\nnewlines  ",
    "",
    LONG,
]


def test_offline_clip_tokenizer_has_the_clip_vocabulary(hf_clip_tokenizer):
    """The oracle (``oracles.clip_tokenizer``, the conftest fixture) has CLIP's 49408 tokens and special ids."""
    tok = hf_clip_tokenizer
    assert len(tok) == 49408
    assert tok.bos_token_id == SOT and tok.eos_token_id == EOT and tok.pad_token_id == EOT


def test_long_prompt_really_is_too_long():
    assert len(SimpleTokenizer().encode(LONG)) > 77


def test_sd1_tokenize_matches_transformers_clip_tokenizer(hf_clip_tokenizer):
    cfg = preset("sd15").text
    ours = tokenize(PROMPTS, cfg)
    ref = hf_clip_tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), 77)
    mismatched = [p for p, a, b in zip(PROMPTS, ours, ref) if not torch.equal(a, b)]
    assert not mismatched, mismatched
    assert (ours[:, 0] == SOT).all()
    assert ours[-1, -1] == EOT                       # truncation keeps end-of-text last
    assert (ours[PROMPTS.index("")][1:] == EOT).all()  # empty prompt: start, end, then end-of-text padding


def test_sd2_tokenize_matches_open_clip_tokenize():
    cfg = preset("sd21").text
    ours = tokenize(PROMPTS, cfg)
    ref = open_clip.tokenize(PROMPTS)
    assert ours.shape == ref.shape == (len(PROMPTS), 77)
    mismatched = [p for p, a, b in zip(PROMPTS, ours, ref) if not torch.equal(a, b)]
    assert not mismatched, mismatched
    assert ours[-1, -1] == EOT
    empty = ours[PROMPTS.index("")]
    assert empty[:2].tolist() == [SOT, EOT] and (empty[2:] == 0).all()  # SD2 pads with 0


def test_sd1_and_sd2_differ_only_in_padding():
    a, b = tokenize(PROMPTS, preset("sd15").text), tokenize(PROMPTS, preset("sd21").text)
    content = b != 0
    assert torch.equal(a[content], b[content])
    assert (a[~content] == EOT).all()


def test_a_long_text_logs_one_warning_naming_the_dropped_tokens_and_the_text(caplog):
    import logging
    cfg = preset("sd15").text
    n_long = len(SimpleTokenizer().encode(LONG))
    with caplog.at_level(logging.WARNING, logger="diffedit.models.text"):
        tokenize(PROMPTS[:4], cfg)
        assert not caplog.records  # short texts: nothing
        tokenize([LONG, "a cat", LONG + " and a bird"], cfg)
    (record,) = caplog.records  # once per call, for both long texts
    msg = record.getMessage()
    assert record.levelno == logging.WARNING and "77 tokens" in msg
    assert f"{n_long - 75} tokens dropped from 'a very long prompt about a red fox ju...'" in msg
    assert f"{n_long + 3 - 75} tokens dropped" in msg and LONG not in msg
