import pytest
import torch

from unif2ace.model import UniF2aceConfig, build_batch
from unif2ace.model.attention import omni_attention_mask

CFG = UniF2aceConfig.preset("tiny")


def brute_force_mask(ids: list[int], real: list[bool]) -> list[list[bool]]:
    block, inside, n_blocks = [], False, 0
    for t in ids:
        if t == CFG.soi_token_id:
            n_blocks, inside = n_blocks + 1, True
        block.append(n_blocks if inside else 0)
        if t == CFG.eoi_token_id:
            inside = False
    L = len(ids)
    mask = [[False] * L for _ in range(L)]
    for q in range(L):
        for k in range(L):
            if not real[q]:
                mask[q][k] = k == q
            elif real[k]:
                mask[q][k] = k <= q or (block[q] > 0 and block[q] == block[k])
    return mask


def random_rows(g: torch.Generator):
    N, K = CFG.num_image_tokens, CFG.codebook_size
    codes = lambda: torch.randint(0, K, (N,), generator=g)  # noqa: E731
    und = [(codes(), torch.randint(0, 1000, (int(n),), generator=g).tolist(), [3] * int(a))
           for n, a in zip(torch.randint(0, 6, (3,), generator=g), torch.randint(1, 5, (3,), generator=g))]
    gen = [(torch.randint(0, 1000, (int(n),), generator=g).tolist(), codes())
           for n in torch.randint(0, 8, (3,), generator=g)]
    return und, gen


def flip_padding(ids: torch.Tensor, real: torch.Tensor):
    """Moves each row's padding to the other side."""
    out_ids, out_real = ids.clone(), real.clone()
    for b in range(ids.shape[0]):
        r = ids[b][real[b]]
        n = r.numel()
        out_ids[b].fill_(CFG.pad_token_id)
        out_real[b].fill_(False)
        if real[b, 0]:  # right-padded → left
            out_ids[b, -n:], out_real[b, -n:] = r, True
        else:
            out_ids[b, :n], out_real[b, :n] = r, True
    return out_ids, out_real


@pytest.mark.parametrize("flip", [False, True])
def test_mask_matches_brute_force(flip):
    g = torch.Generator().manual_seed(0)
    und, gen = random_rows(g)
    batch = build_batch(CFG, understanding=und, generation=gen, generator=g, caption_dropout=0.5)
    ids, real = batch["input_ids"], batch["padding_mask"]
    if flip:
        ids, real = flip_padding(ids, real)
    assert not real[:3, -1].all() or flip  # understanding rows are right-padded in build_batch
    mask = omni_attention_mask(ids, real, CFG.soi_token_id, CFG.eoi_token_id)
    assert mask.shape == (ids.shape[0], 1, ids.shape[1], ids.shape[1])
    for b in range(ids.shape[0]):
        expected = torch.tensor(brute_force_mask(ids[b].tolist(), real[b].tolist()))
        assert torch.equal(mask[b, 0], expected), f"row {b}"
    assert mask.any(-1).all()  # no empty row


def test_mask_semantics_generation_row():
    c = CFG
    ids = torch.tensor([[c.pad_token_id, c.t2i_token_id, c.sot_token_id, 5, c.eot_token_id, c.soi_token_id,
                         c.mask_token_id, c.image_token_offset + 3, c.eoi_token_id]])
    real = ids != c.pad_token_id
    m = omni_attention_mask(ids, real, c.soi_token_id, c.eoi_token_id)[0, 0]
    assert not m[:, 0][1:].any() and m[0, 0]  # the pad is seen by nobody but itself
    assert m[6, 1:].all()  # an image token sees all real text and the whole image block
    assert not m[3, 4:].any()  # text is causal
    assert m[5, 8] and m[8, 5]  # <|soi|> and <|eoi|> belong to the block
