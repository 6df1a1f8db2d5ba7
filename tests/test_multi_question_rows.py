"""Understanding rows with several questions about one image: the sequence layout and labels, and the batch order
that packs them within a token budget."""
import os

import pytest
import torch

from test_train_helpers import one_thread, tiny_setup  # noqa: F401  (one_thread: autouse fixture)
from unif2ace.model import UniF2aceConfig, UniF2aceModel, build_batch
from unif2ace.model.batch import IGNORE_INDEX, understanding_length, understanding_sequence

CFG = UniF2aceConfig.preset("tiny")
N = CFG.num_image_tokens


def test_sequence_layout_and_labels():
    c = CFG
    codes = list(range(N))
    turns = [([11, 12], [21]), ([13], [22, 23]), ([14, 15, 16], [24])]
    ids, labels = understanding_sequence(c, codes, *turns[0], more_turns=turns[1:])
    image = [c.soi_token_id] + [c.image_token_offset + v for v in codes] + [c.eoi_token_id]
    expected = [c.mmu_token_id] + image
    for p, a in turns:
        expected += [c.sot_token_id] + p + a + [c.eot_token_id]
    assert ids == expected and len(ids) == understanding_length(N, turns)
    supervised = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert supervised == [21, c.eot_token_id, 22, 23, c.eot_token_id, 24, c.eot_token_id]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))
    # one turn is the single-question row exactly
    assert understanding_sequence(c, codes, *turns[0]) == understanding_sequence(c, codes, *turns[0], more_turns=())


def test_batch_with_more_turns_trains_and_routes_on_the_first_question():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, CFG.codebook_size, (N,), generator=g)
    single = build_batch(CFG, understanding=[(codes, [5, 6], [7])])
    multi = build_batch(CFG, understanding=[(codes, [5, 6], [7], [([8], [9, 10])])])
    model = UniF2aceModel(CFG)
    # the sequence router pools the tokens before the first supervised label: the same in both rows
    ctx_single = model.context_mask(single["input_ids"], single["padding_mask"], single["task"], single["labels"])
    ctx_multi = model.context_mask(multi["input_ids"], multi["padding_mask"], multi["task"], multi["labels"])
    n = ctx_single.shape[1]
    assert torch.equal(ctx_multi[:, :n], ctx_single) and not ctx_multi[:, n:].any()
    out = model(multi)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # the first answer is predicted as in the single-question row (causal attention: later turns cannot leak)
    model.eval()

    def hidden(b, ctx):
        emb = model.image_embeddings(1, torch.device("cpu"))
        return model.transformer(b["input_ids"], b["padding_mask"].bool(), b["task"], context_mask=ctx,
                                 embeddings=emb)[0]

    with torch.no_grad():
        a = hidden(single, ctx_single)[0]
        b = hidden(multi, ctx_multi)[0, :n]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def order_parts(tmp_path_factory):
    from unif2ace.data import FaceDataset
    from unif2ace.training.data import TokenizedFaces
    from unif2ace.training.trainer import load_tokenizers, model_config_for

    root = str(tmp_path_factory.mktemp("order"))
    paths = tiny_setup(root)
    image_tok, text_tok = load_tokenizers(paths["tokenizers"])
    config = model_config_for(image_tok, text_tok, "tiny", max_position_embeddings=256)
    model = UniF2aceModel(config)
    ds = FaceDataset(paths["data"], split="train", image_size=32)
    data = TokenizedFaces.build(ds, image_tok, text_tok, {"clip": model.clip_encoder, "face": model.face_encoder},
                                cache_dir=os.path.join(root, "cache"), progress=False)
    return data, config


@pytest.mark.parametrize("budget", [0, 1, 70, 90, 200, 250])
def test_batch_order_packs_questions_of_the_same_image(order_parts, budget):
    from unif2ace.training.data import BatchOrder

    data, config = order_parts
    kw = dict(micro_batch_size=8, micro_batches_per_step=1, generation_fraction=0.25, caption_fraction=0.0, seed=3)
    order = BatchOrder(data, config, vqa_row_tokens=budget, **kw)
    plain = BatchOrder(data, config, **kw)
    n_vqa = order.n_vqa
    for step in range(4):
        picked = order.vqa.take(step * n_vqa, n_vqa)
        for j in picked:
            more = order.more_questions(j, step, 0)
            i, p, a = order.vqa_rows[j]
            turns = [(p, a)] + more
            if budget == 0:
                assert more == []
            else:
                assert understanding_length(config.num_image_tokens, turns) <= max(
                    budget, understanding_length(config.num_image_tokens, turns[:1]))
            own = [(q, r) for k, q, r in order.vqa_rows if k == i]
            for t in more:
                assert t in own  # questions about the same image
            for t in turns:  # no question taken twice (a pair may repeat only as often as the image has it)
                assert turns.count(t) <= own.count(t)
            everything = [order.vqa_rows[k][1:] for k in order.vqa_of_image[i]]
            if budget and understanding_length(config.num_image_tokens, everything) <= budget:
                assert len(turns) == len(everything)  # all of the image's questions fit: all are taken
            if budget:  # and a question left out would not have fitted
                for q, r in everything:
                    if (q, r) not in turns:
                        assert understanding_length(config.num_image_tokens, turns + [(q, r)]) > budget
            assert more == order.more_questions(j, step, 0)  # deterministic (resume replays it)
        batch = order.micro_batch(step, 0)
        reference = plain.micro_batch(step, 0)
        first = (reference["labels"][:n_vqa] != IGNORE_INDEX).sum()
        assert (batch["labels"][:n_vqa] != IGNORE_INDEX).sum() >= first
        if budget == 0:
            assert all(torch.equal(batch[k], reference[k]) for k in ("input_ids", "labels", "image_targets"))
