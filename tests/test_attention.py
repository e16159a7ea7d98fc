"""Attention backends: SDPA matches the textbook formula; xformers refuses CPU clearly."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize, tiny_vit

from dinospec.models.layers import Attention
from dinospec.models.streams import Streams


def test_sdpa_matches_explicit_softmax_attention():
    attn = randomize(Attention(32, 4, True, True, "sdpa", frozenset()))
    x = torch.randn(2, 7, 32)
    b, n, c = x.shape
    q, k, v = (
        F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
    )
    weights = (q @ k.transpose(-2, -1) / 8**0.5).softmax(-1)
    attended = (weights @ v).transpose(1, 2).reshape(b, n, c)
    expected = F.linear(attended, attn.proj.weight, attn.proj.bias)
    (out,) = attn(Streams.of_sequence(x, 0)).parts
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_xformers_backend_explains_why_it_cannot_run_on_cpu():
    with pytest.raises(RuntimeError, match="xformers") as info:
        tiny_vit(attn_backend="xformers")(torch.randn(1, 3, 32, 32))
    assert "CUDA" in str(info.value) and "sdpa" in str(info.value)


def test_xformers_device_check_when_installed(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "xformers" else real_find_spec(name, *a),
    )
    model = tiny_vit(attn_backend="xformers")
    with pytest.raises(RuntimeError, match=r"only on CUDA tensors .* device 'cpu'"):
        model(torch.randn(1, 3, 32, 32))
