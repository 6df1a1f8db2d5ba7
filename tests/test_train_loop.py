"""Training loop: loss falls, resume equals an uninterrupted run, damaged checkpoints are skipped."""
import os

import pytest

from test_train_helpers import one_thread, read_log, tiny_config  # noqa: F401 (one_thread: autouse fixture)
from unif2ace.training import train
from unif2ace.training import checkpoint


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("train"))


def test_loss_falls(root):
    out = os.path.join(root, "falls")
    result = train(tiny_config(root, out, steps=30, lr=5e-3, warmup_steps=3, checkpoint_every=100))
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    first = sum(r["loss"] for r in log[:4]) / 4
    last = sum(r["loss"] for r in log[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    for key in ("text", "image", "token_balance", "seq_balance", "lr", "step_time", "grad_norm"):
        assert key in log[-1]
    # the run ends as a pipeline directory
    for sub in ("model", "image_tokenizer", "text_tokenizer"):
        assert os.path.isdir(os.path.join(out, sub))
    assert result["step"] == 30


def test_resume_equals_uninterrupted(root):
    full = os.path.join(root, "full")
    train(tiny_config(root, full))
    parted = os.path.join(root, "parted")
    train(tiny_config(root, parted, stop_after=3))
    assert [r["step"] for r in read_log(parted)] == [1, 2, 3]
    assert os.path.basename(checkpoint.list_checkpoints(parted)[-1]) == "step_0000003"
    train(tiny_config(root, parted, resume=True))
    a, b = read_log(full), read_log(parted)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for key in ("loss", "text", "image", "token_balance", "seq_balance", "lr"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])


def test_damaged_checkpoint_falls_back(root):
    out = os.path.join(root, "damaged")
    train(tiny_config(root, out))  # checkpoints at steps 3 and 6
    ckpts = checkpoint.list_checkpoints(out)
    assert [os.path.basename(c) for c in ckpts] == ["step_0000003", "step_0000006"]
    weights = os.path.join(ckpts[-1], "model.safetensors")
    with open(weights, "r+b") as f:  # a partial write: the file is cut short
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.warns(UserWarning, match="damaged checkpoint"):
        found = checkpoint.load_latest(out)
    assert found[0] == ckpts[0] and found[3]["step"] == 3
    # an interrupted write leaves only a temporary directory, never a step_* one without checksums
    os.makedirs(os.path.join(out, "checkpoints", "step_0000009"))
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        found = checkpoint.load_latest(out)
    assert found[3]["step"] == 3
    # resuming continues from the good checkpoint
    with pytest.warns(UserWarning):
        train(tiny_config(root, out, resume=True, steps=6))
    assert [r["step"] for r in read_log(out)] == list(range(1, 7))


def test_bf16_autocast_runs(root):
    # precision="auto" is fp32 on CPU; "bf16" forces autocast (what CUDA runs by default) and stays near fp32
    a, b = os.path.join(root, "fp32"), os.path.join(root, "bf16")
    train(tiny_config(root, a, steps=3, checkpoint_every=100))
    train(tiny_config(root, b, steps=3, checkpoint_every=100, precision="bf16"))
    la, lb = read_log(a), read_log(b)
    assert [r["loss"] for r in la] != [r["loss"] for r in lb]
    for ra, rb in zip(la, lb):
        assert abs(ra["loss"] - rb["loss"]) < 0.05 * ra["loss"]
