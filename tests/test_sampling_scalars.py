"""Scalar arguments of the sampling ops: a bad value raises ValueError naming the argument, before any kernel
runs; integers of any Python size and numpy / 0-d tensor integers are handled without a cast error."""
import math

import numpy as np
import pytest
import torch

from unif2ace import ops

K = 12
LOGITS = torch.randn(3, K)
COND = torch.randn(2, 4, K)
TOKENS = torch.full((2, 4), K)


def next_token(**kw):
    return ops.sample_next_token(LOGITS, **{"seed": 0, **kw})


def maskgit(**kw):
    args = {"mask_id": K, "seed": 0, **kw}
    return ops.maskgit_step(COND, TOKENS, 0, 4, **args)


def generate(**kw):
    args = {"num_steps": 2, "mask_id": K, "seed": 0, **kw}
    shape = (args.pop("batch_size", 2), args.pop("num_tokens", 4), args.pop("codebook_size", K))
    return ops.maskgit_generate(lambda t: torch.randn(t.shape[0], t.shape[1], K), *shape, **args)


BAD = [
    (next_token, dict(temperature=1e-45), "temperature"),  # 1/T overflows float32: not the logits' fault
    (next_token, dict(temperature=2e-39), "temperature"),
    (next_token, dict(temperature=math.nan), "temperature"),
    (next_token, dict(temperature=-math.inf), "temperature"),
    (next_token, dict(temperature=1e39), "temperature"),
    (next_token, dict(temperature="hot"), "temperature"),
    (next_token, dict(top_k=-1), "top_k"),
    (next_token, dict(top_k=2.0), "top_k"),
    (next_token, dict(top_k=True), "top_k"),
    (next_token, dict(top_p=math.nan), "top_p"),
    (next_token, dict(seed=2**63), "seed"),
    (next_token, dict(seed=-1), "seed"),
    (next_token, dict(seed=1.0), "seed"),
    (next_token, dict(offset=2**64), "offset"),
    (maskgit, dict(mask_id=2**63), "mask_id"),
    (maskgit, dict(mask_id=-2**63 - 1), "mask_id"),
    (maskgit, dict(mask_id=float(K)), "mask_id"),
    (maskgit, dict(mask_id=K - 1), "mask_id"),
    (maskgit, dict(temperature=1e-45), "temperature"),
    (maskgit, dict(temperature=0.0), "temperature"),
    (maskgit, dict(choice_temperature=1e300), "choice_temperature"),
    (maskgit, dict(choice_temperature=-1.0), "choice_temperature"),
    (maskgit, dict(guidance_scale=1e300, uncond_logits=COND), "guidance_scale"),
    (maskgit, dict(guidance_scale=math.nan, uncond_logits=COND), "guidance_scale"),
    (maskgit, dict(seed=2**63), "seed"),
    (maskgit, dict(offset=-1), "offset"),
    (generate, dict(mask_id=2**63), "mask_id"),
    (generate, dict(batch_size=-1), "batch_size"),
    (generate, dict(codebook_size=0), "codebook_size"),
    (generate, dict(offset=2**63 - 1), "offset"),  # step 1 would use offset 2**63
]


@pytest.mark.parametrize("call,kwargs,name", BAD, ids=[f"{c.__name__}-{n}-{i}" for i, (c, _, n) in enumerate(BAD)])
def test_bad_scalar_names_the_argument(call, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        call(**kwargs)


def test_integers_of_any_kind():
    base = next_token(top_p=0.9, top_k=0)
    # any top_k at or above the vocabulary keeps the whole row, however large
    for top_k in (K, 2**63 - 1, 2**63, 2**200):
        assert torch.equal(next_token(top_p=0.9, top_k=top_k), base)
    # numpy and 0-d tensor integers are ints
    assert torch.equal(next_token(seed=np.int64(5), offset=np.uint8(2)), next_token(seed=5, offset=2))
    assert torch.equal(next_token(top_k=torch.tensor(3)), next_token(top_k=3))
    a = maskgit(mask_id=np.int64(K))
    b = maskgit(mask_id=K)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    low, minus_one = (ops.maskgit_step(COND, torch.full((2, 4), m), 0, 4, mask_id=m, seed=1) for m in (-2**63, -1))
    assert torch.equal(low[1], minus_one[1]) and (low[0] == -2**63).any()
    # the largest offset a whole generation can use
    assert generate(offset=2**63 - 2).shape == (2, 4)


def test_small_temperature_limits():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    # the smallest accepted temperature is fine on logits it does not overflow ...
    assert ops.sample_next_token(logits * 1e-3, temperature=3e-39, seed=0).item() == 1
    # ... and an overflow it causes is reported with the temperature in the message
    with pytest.raises(ValueError, match=r"logits\[0\]: logits divided by the temperature contain NaN or \+inf"):
        ops.sample_next_token(logits, temperature=3e-39, seed=0)
    assert ops.sample_next_token(logits, temperature=0, seed=0).item() == 1
