"""Speed and memory options of a training step (activation checkpointing, the fused AdamW) compute the same step as
the plain one. flex_attention with gradients on CUDA: tests/test_model_generation.py; the faster CUDA step over 20
steps against the plain one: the train_loss section of `python -m benchmarks --gpu` (compiled blocks the same way:
`python -m benchmarks.bench_model_step --device cuda --loss-check 20 --variants kernels,kernels+flex+fused+compile`)."""
import os

import pytest
import torch

from test_train_helpers import one_thread, read_log, tiny_config  # noqa: F401 (one_thread: autouse fixture)
from unif2ace.model import UniF2aceConfig, UniF2aceModel, build_batch
from unif2ace.training import train

CFG = UniF2aceConfig.preset("tiny")


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, CFG.text_vocab_size - 1, (n,), generator=g).tolist()  # noqa: E731
    codes = lambda: torch.randint(0, CFG.codebook_size, (CFG.num_image_tokens,), generator=g)  # noqa: E731
    return build_batch(CFG, understanding=[(codes(), text(3), text(4)) for _ in range(2)],
                       generation=[(text(5), codes()) for _ in range(2)], generator=g)


def _losses(steps: int, *, checkpointing: bool, fused: bool) -> list[float]:
    torch.manual_seed(0)
    model = UniF2aceModel(CFG)
    model.set_activation_checkpointing(checkpointing)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3, fused=fused or None)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)  # the Noise expert draws in training mode: recomputation must replay the draw
        loss = model(_batch(step % 3)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_checkpointing_and_fused_adamw_follow_the_plain_step_for_20_steps():
    plain = _losses(20, checkpointing=False, fused=False)
    fast = _losses(20, checkpointing=True, fused=True)
    assert plain[-1] < plain[0]
    for a, b in zip(plain, fast):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_activation_checkpointing_frees_block_activations():
    # Under checkpointing the graph keeps only each block's inputs: far fewer saved tensors.
    torch.manual_seed(0)
    model = UniF2aceModel(CFG)
    counts = []
    for enabled in (False, True):
        model.set_activation_checkpointing(enabled)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            model(_batch(0)).loss.backward()
        counts.append(sum(saved))
    assert counts[1] < 0.7 * counts[0], counts


def test_trainer_options(tmp_path):
    root = str(tmp_path)
    a, b = os.path.join(root, "plain"), os.path.join(root, "ckpt")
    train(tiny_config(root, a, steps=3, checkpoint_every=100))
    train(tiny_config(root, b, steps=3, checkpoint_every=100, activation_checkpointing=True))
    for ra, rb in zip(read_log(a), read_log(b)):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
