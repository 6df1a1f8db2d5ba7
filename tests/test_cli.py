"""The unif2ace command on a tiny model: train, generate, ask, caption, eval."""
import os

import numpy as np
import pytest
from PIL import Image

from test_train_helpers import TINY_MODEL, one_thread, tiny_setup  # noqa: F401 (one_thread: autouse fixture)
from unif2ace.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cli"))
    paths = tiny_setup(root)
    out = os.path.join(root, "run")
    import json
    main(["train", "--data-dir", paths["data"], "--tokenizer-dir", paths["tokenizers"], "--out-dir", out,
          "--cache-dir", os.path.join(root, "cache"), "--steps", "3", "--batch-size", "8", "--micro-batch-size", "8",
          "--model-overrides", json.dumps(TINY_MODEL), "--checkpoint-every", "100", "--no-progress"])
    return {"root": root, "out": out, **paths}


def test_train_wrote_a_pipeline(run):
    for sub in ("model", "image_tokenizer", "text_tokenizer", "checkpoints"):
        assert os.path.isdir(os.path.join(run["out"], sub))


def test_generate(run, tmp_path, capsys):
    png = str(tmp_path / "grid.png")
    main(["generate", "--model", run["out"], "--prompt", "happy face, blue background", "--prompt", "sad face",
          "--num-images", "2", "--steps", "3", "--out", png, "--seed", "1"])
    im = Image.open(png)
    assert im.size[0] > 4 * 32 and im.size[1] > 32
    assert "wrote 4 faces" in capsys.readouterr().out


def test_ask_and_caption(run, capsys):
    image = os.path.join(run["data"], "images", "000000.png")
    main(["ask", "--model", run["out"], "--image", image, "--question", "What colour is the background?"])
    main(["caption", "--model", run["out"], "--image", image])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2  # an untrained model answers something (maybe empty), without failing


def test_eval(run, tmp_path, capsys):
    out = str(tmp_path / "eval")
    main(["eval", "--model", run["out"], "--data", run["data"], "--out", out, "--num-generate", "4", "--num-vqa", "8",
          "--num-captions", "4", "--steps", "2", "--classifier-steps", "5"])
    text = capsys.readouterr().out
    assert "Generation attribute accuracy" in text and "VQA exact match" in text
    assert os.path.exists(os.path.join(out, "eval.json")) and os.path.exists(os.path.join(out, "eval_table.md"))


def test_pipeline_api(run):
    from unif2ace import FacePipeline

    pipe = FacePipeline.from_pretrained(run["out"])
    images = pipe.generate(["happy face"], num_images_per_prompt=2, steps=2, guidance_scale=1.0, seed=3)
    again = pipe.generate(["happy face"], num_images_per_prompt=2, steps=2, guidance_scale=1.0, seed=3)
    assert len(images) == 2 and images[0].size == (32, 32)
    assert (np.asarray(images[0]) == np.asarray(again[0])).all()  # seeded
    assert isinstance(pipe.answer(images[0], "Is the person wearing a hat?"), str)
    assert isinstance(pipe.caption(images[1]), str)
