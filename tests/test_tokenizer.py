"""Our ``tokenize`` against the two reference tokenizers SD uses.

SD1 (ldm FrozenCLIPEmbedder): transformers' ``CLIPTokenizer`` with padding="max_length", max_length=77,
truncation=True, pad = end-of-text. Built offline from open_clip's copy of the OpenAI BPE vocabulary, the
same way the HF CLIP tokenizer files were made. SD2 (FrozenOpenCLIPEmbedder): ``open_clip.tokenize`` (pad 0).
"""
from __future__ import annotations

import gzip
import json
import os

import open_clip  # heavy import at collection, not inside the first test's timing
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode
from transformers import CLIPTokenizer

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


@pytest.fixture(scope="module")
def hf_clip_tokenizer(tmp_path_factory):
    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(str(folder), pad_token="<|endoftext|>", model_max_length=77)
    assert tok.bos_token_id == SOT and tok.eos_token_id == EOT and tok.pad_token_id == EOT
    return tok


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
