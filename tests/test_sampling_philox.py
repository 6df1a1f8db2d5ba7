"""Philox 4x32-10 noise of the sampling kernels against an independent pure-Python implementation written from
the published algorithm (Salmon et al., SC'11) and Random123's known-answer vectors."""
import math

import numpy as np
import pytest
import torch

from unif2ace import ops

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def philox_py(ctr, key, rounds=10):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
    return c0, c1, c2, c3


def stream_py(seed, offset, index):
    ctr = (index & MASK32, index >> 32, offset & MASK32, offset >> 32)
    return philox_py(ctr, (seed & MASK32, seed >> 32))


def test_python_philox_matches_random123_known_answers():
    # Random123 kat_vectors, philox4x32 with 10 rounds.
    assert philox_py((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox_py((MASK32,) * 4, (MASK32, MASK32)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert philox_py((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@pytest.mark.parametrize("seed,offset", [(0, 0), (1, 0), (12345, 7), (2**40 + 3, 2**33 + 5), (2**63 - 1, 2**63 - 1)])
def test_uniform64_is_philox_block_of_each_index(seed, offset):
    n = 37
    got = ops.philox_noise(n, seed, offset, kind="uniform64").tolist()
    for i in range(n):
        x = stream_py(seed, offset, i)
        assert got[i] & 0xFFFFFFFFFFFFFFFF == (x[1] << 32) | x[0], i


def test_kernel_zero_counter_known_answer():
    x = ops.philox_noise(1, 0, 0, kind="uniform64").item() & 0xFFFFFFFFFFFFFFFF
    assert x == (0xE169C58D << 32) | 0x6627E8D5


def test_uniform_and_gumbel_transforms():
    seed, offset, n = 99, 3, 2000
    uni = ops.philox_noise(n, seed, offset, kind="uniform")
    gum = ops.philox_noise(n, seed, offset, kind="gumbel")
    assert uni.dtype == torch.float64 and gum.dtype == torch.float32
    want_u, want_g = [], []
    for i in range(n):
        x = stream_py(seed, offset, i)
        want_u.append((((x[1] << 32) | x[0]) >> 11) * 2.0**-53)
        u = ((x[2] >> 9) + 0.5) * 2.0**-23
        want_g.append(-math.log(-math.log(u)))
    assert uni.tolist() == want_u
    assert np.allclose(gum.double().numpy(), np.array(want_g), rtol=2e-6, atol=2e-6)
    assert bool(torch.isfinite(gum).all())


def test_layout_and_shape():
    flat = ops.philox_noise(24, 5, 1, kind="gumbel")
    shaped = ops.philox_noise((2, 3, 4), 5, 1, kind="gumbel")
    assert shaped.shape == (2, 3, 4)
    assert torch.equal(flat.view(2, 3, 4), shaped)
    # different offsets and seeds give different streams
    assert not torch.equal(ops.philox_noise(24, 5, 2, kind="gumbel"), flat)
    assert not torch.equal(ops.philox_noise(24, 6, 1, kind="gumbel"), flat)


def test_independent_of_thread_count():
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.philox_noise(10001, 3, 4, kind="gumbel")
        torch.set_num_threads(max(2, prev))
        b = ops.philox_noise(10001, 3, 4, kind="gumbel")
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(a, b)


def test_gumbel_law():
    from scipy import stats

    g = ops.philox_noise(20000, 11, 0, kind="gumbel").double().numpy()
    assert stats.kstest(g, stats.gumbel_r.cdf).pvalue > 1e-3
    u = ops.philox_noise(20000, 11, 0, kind="uniform").numpy()
    assert stats.kstest(u, stats.uniform.cdf).pvalue > 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        ops.philox_noise(3, 0, kind="normal")
    with pytest.raises(ValueError, match="seed"):
        ops.philox_noise(3, -1)
    with pytest.raises(ValueError, match="offset"):
        ops.philox_noise(3, 0, 2**63)


def test_opcheck():
    torch.library.opcheck(torch.ops.unif2ace.philox_noise.default, ([3, 5], 1, 2, "gumbel", torch.device("cpu")))
    torch.library.opcheck(torch.ops.unif2ace.philox_noise.default, ([7], 1, 2, "uniform", torch.device("cpu")))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    for kind in ("uniform", "gumbel", "uniform64"):
        a = ops.philox_noise((33, 65), 77, 2**35 + 1, kind=kind)
        b = ops.philox_noise((33, 65), 77, 2**35 + 1, kind=kind, device="cuda").cpu()
        assert torch.equal(a, b), kind
