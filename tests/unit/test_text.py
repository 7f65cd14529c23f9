"""The text encoder interface, the real MiniLM encoder (offline) and the test-only hash encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_core.text import (
    HashTextEncoder,
    TextEmbeddings,
    TextEncoder,
    available_text_encoders,
    load_text_encoder,
    normalize_caption,
    register_text_encoder,
)


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return load_text_encoder("all-MiniLM-L6-v2", max_tokens=8)


def test_registry_lists_both_and_rejects_unknown():
    assert {"all-MiniLM-L6-v2", "hash-test"} <= set(available_text_encoders())
    with pytest.raises(ValueError, match="unknown text encoder 'nope'.*all-MiniLM-L6-v2"):
        load_text_encoder("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_text_encoder("hash-test")(lambda **kw: HashTextEncoder(**kw))
    with pytest.raises(ValueError, match="max_tokens"):
        load_text_encoder("hash-test", max_tokens=0)


def test_normalize_caption():
    assert normalize_caption("  a\u0301  red\tcircle \n") == "\u00e1 red circle"
    assert normalize_caption(" \n\t ") == ""


def test_minilm_shapes_ids_and_null_condition(minilm):
    assert isinstance(minilm, TextEncoder)
    assert minilm.dim == 384 and minilm.max_tokens == 8
    assert "all-MiniLM-L6-v2" in minilm.id and "==" in minilm.id
    caps = ["a red circle", "", "a very long caption " + "with many words " * 10]
    e = minilm.encode(caps, batch_size=4)
    assert isinstance(e, TextEmbeddings) and len(e) == 3
    assert e.pooled.shape == (3, 384) and e.pooled.dtype == torch.float32
    assert e.tokens.shape == (3, 8, 384) and e.tokens.dtype == torch.float32
    assert e.mask.shape == (3, 8) and e.mask.dtype == torch.bool
    # "a red circle" is [CLS] a red circle [SEP]: 5 tokens; zero-padded beyond.
    assert e.mask[0].tolist() == [True] * 5 + [False] * 3
    assert int(e.lengths[0]) == 5
    assert torch.all(e.tokens[0, 5:] == 0)
    # the null condition
    assert torch.all(e.pooled[1] == 0) and torch.all(e.tokens[1] == 0) and not e.mask[1].any()
    # truncation of tokens, not of the pooled embedding
    assert e.mask[2].all() and int(e.lengths[2]) > 8
    norms = e.pooled[[0, 2]].norm(dim=1)
    assert torch.allclose(norms, torch.ones(2), atol=1e-5)


def test_minilm_pooled_matches_sentence_transformers(minilm):
    caps = ["a red circle above a small blue square", "two green triangles"]
    ref = minilm.model.encode(caps, convert_to_tensor=True).float()
    got = minilm.encode(caps).pooled
    assert torch.allclose(got, ref, atol=1e-5)
    # and it carries meaning: similar captions are closer than unrelated ones
    e = minilm.encode(["a red circle", "a red disc", "quarterly tax report"]).pooled
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_minilm_is_batch_invariant_bit_for_bit(minilm):
    """A caption's embedding does not depend on what else is in the batch, nor on batch size."""
    x = "a purple hexagon to the left of a yellow star"
    others = [f"caption number {i} about {w}" for i, w in enumerate("abcdefghijklmnopqrst")]
    enc = load_text_encoder("all-MiniLM-L6-v2", max_tokens=8)
    enc.cache_size = 0  # no cache: every call computes
    alone = enc.encode([x])
    mixed = enc.encode(others[:7] + [x] + others[7:])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's thread setting does not matter either
    try:
        small = enc.encode(["q", x, "z z z"])
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for e, i in ((mixed, 7), (small, 1)):
        assert torch.equal(e.pooled[i], alone.pooled[0])
        assert torch.equal(e.tokens[i], alone.tokens[0])
    # another micro-batch size: the same to float rounding (bit-identity is per batch_size)
    big = enc.encode([x], batch_size=32)
    assert torch.allclose(big.pooled[0], alone.pooled[0], atol=1e-6)
    assert enc.cache_info()["size"] == 0


def test_cache_is_lru_and_consistent(minilm):
    enc = HashTextEncoder(max_tokens=4, dim=16, cache_size=2)
    a = enc.encode(["one", "two"])
    assert enc.cache_info() == {"size": 2, "max_size": 2}
    enc.encode(["one", "three"])  # evicts "two", the least recently used
    assert set(enc._cache) == {"one", "three"}
    b = enc.encode(["two", "one"])
    assert torch.equal(a.pooled[0], b.pooled[1]) and torch.equal(a.tokens[1], b.tokens[0])
    # results are copies: mutating one does not change the cache
    b.pooled.zero_()
    assert torch.equal(enc.encode(["one"]).pooled[0], a.pooled[0])
    # normalisation happens before the cache lookup
    assert torch.equal(enc.encode(["  one "]).pooled[0], a.pooled[0])


def test_hash_encoder_is_deterministic_and_for_tests():
    e1 = load_text_encoder("hash-test", max_tokens=3).encode(["a b c d e", ""])
    e2 = load_text_encoder("hash-test", max_tokens=3).encode(["a b c d e", ""])
    assert torch.equal(e1.tokens, e2.tokens) and e1.mask[0].all() and not e1.mask[1].any()
    assert int(e1.lengths[0]) == 5
    assert np.isclose(float(e1.pooled[0].norm()), 1.0)


def test_encode_rejects_a_bare_string(minilm):
    with pytest.raises(TypeError, match="list of captions"):
        minilm.encode("a red circle")
