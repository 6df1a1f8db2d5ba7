"""The unif2ace command on a tiny model: train, generate, ask, caption, eval; help texts; and every user error is one
line on stderr with a non-zero exit status (the traceback only with --debug)."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from test_train_helpers import TINY_MODEL, one_thread, tiny_setup  # noqa: F401 (one_thread: autouse fixture)
from unif2ace.cli import TRAIN_HELP, UserError, build_parser, main
from unif2ace.training.config import TrainConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cli"))
    paths = tiny_setup(root)
    out = os.path.join(root, "run")
    assert main(["train", "--data-dir", paths["data"], "--tokenizer-dir", paths["tokenizers"], "--out-dir", out,
                 "--cache-dir", os.path.join(root, "cache"), "--steps", "3", "--batch-size", "8",
                 "--micro-batch-size", "8", "--model-overrides", json.dumps(TINY_MODEL), "--checkpoint-every", "100",
                 "--no-progress", "--threads", "1"]) == 0
    return {"root": root, "out": out, **paths}


def test_train_wrote_a_pipeline(run):
    for sub in ("model", "image_tokenizer", "text_tokenizer", "checkpoints"):
        assert os.path.isdir(os.path.join(run["out"], sub))


def test_generate_writes_the_grid_and_each_face(run, tmp_path, capsys):
    png = str(tmp_path / "grid.png")
    assert main(["generate", "--model", run["out"], "--prompt", "happy face, blue background", "--prompt", "sad face",
                 "--num-images-per-prompt", "2", "--num-inference-steps", "3", "--out", png, "--seed", "1",
                 "--threads", "1"]) == 0
    captured = capsys.readouterr()
    im = Image.open(png)
    assert im.size[0] > 4 * 32 and im.size[1] > 32
    faces = [tmp_path / f"grid_{i}.png" for i in range(4)]
    assert all(f.exists() for f in faces) and Image.open(faces[0]).size == (32, 32)
    assert "wrote 4 faces" in captured.out
    assert "generating 4 face(s)" in captured.err and "1 CPU thread" in captured.err  # not silent while it works
    # the same faces as the pipeline gives for the same settings (older flag spellings still work)
    from unif2ace import FacePipeline

    pipe = FacePipeline.from_pretrained(run["out"])
    want = pipe(["happy face, blue background", "sad face"], num_images_per_prompt=2, num_inference_steps=3,
                seed=1).images
    assert np.array_equal(np.asarray(Image.open(faces[3])), np.asarray(want[3]))
    old = str(tmp_path / "old.png")
    assert main(["generate", "--model", run["out"], "--prompt", "sad face", "--num-images", "1", "--steps", "3",
                 "--guidance", "3", "--out", old, "--seed", "1", "--threads", "1"]) == 0
    assert os.path.exists(str(tmp_path / "old_0.png"))


def test_ask_and_caption_on_a_generated_face(run, tmp_path, capsys):
    png = str(tmp_path / "grid.png")
    main(["generate", "--model", run["out"], "--prompt", "happy face", "--num-images-per-prompt", "1",
          "--num-inference-steps", "2", "--out", png, "--threads", "1"])
    capsys.readouterr()
    face = str(tmp_path / "grid_0.png")
    assert main(["ask", "--model", run["out"], "--image", face, "--question", "What colour is the background?"]) == 0
    assert main(["caption", "--model", run["out"], "--image", face]) == 0
    captured = capsys.readouterr()
    from unif2ace import FacePipeline

    pipe = FacePipeline.from_pretrained(run["out"])
    # the answer and the caption, nothing else on stdout (an untrained model's text may hold any character)
    assert captured.out == f"{pipe.answer(face, 'What colour is the background?')}\n{pipe.caption(face)}\n"


def test_eval(run, tmp_path, capsys):
    out = str(tmp_path / "eval")
    assert main(["eval", "--model", run["out"], "--data-dir", run["data"], "--out-dir", out, "--num-generate", "4",
                 "--num-vqa", "8", "--num-captions", "4", "--num-inference-steps", "2", "--classifier-steps", "5",
                 "--no-progress", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "Generation attribute accuracy" in text and "VQA exact match" in text
    assert os.path.exists(os.path.join(out, "eval.json")) and os.path.exists(os.path.join(out, "eval_table.md"))
    assert "judge (attribute classifier) on the real held-out faces" in text  # its accuracy beside its score
    # the judge cached in --out-dir is reused only with the same settings, and says so; other settings retrain it
    small = ["--num-generate", "2", "--num-vqa", "2", "--num-captions", "2", "--num-inference-steps", "1",
             "--no-progress", "--threads", "1"]
    assert main(["eval", "--model", run["out"], "--data-dir", run["data"], "--out-dir", out,
                 "--classifier-steps", "5", *small]) == 0
    assert "attribute classifier: reusing" in capsys.readouterr().out
    assert main(["eval", "--model", run["out"], "--data-dir", run["data"], "--out-dir", out,
                 "--classifier-steps", "6", *small]) == 0
    text = capsys.readouterr().out
    assert "retraining" in text and "steps 5 → 6" in text and "reusing" not in text
    old = str(tmp_path / "eval-old")  # the older --data / --out spellings
    assert main(["eval", "--model", run["out"], "--data", run["data"], "--out", old, "--num-generate", "2",
                 "--num-vqa", "2", "--num-captions", "2", "--steps", "1", "--classifier-steps", "2",
                 "--no-progress", "--threads", "1"]) == 0
    assert os.path.exists(os.path.join(old, "eval.json"))


def test_pipeline_api(run):
    from unif2ace import FacePipeline

    pipe = FacePipeline.from_pretrained(run["out"])
    images = pipe.generate(["happy face"], num_images_per_prompt=2, steps=2, guidance_scale=1.0, seed=3)
    again = pipe.generate(["happy face"], num_images_per_prompt=2, steps=2, guidance_scale=1.0, seed=3)
    assert len(images) == 2 and images[0].size == (32, 32)
    assert (np.asarray(images[0]) == np.asarray(again[0])).all()  # seeded
    assert isinstance(pipe.answer(images[0], "Is the person wearing a hat?"), str)
    assert isinstance(pipe.caption(images[1]), str)


# --------------------------------------------------------------------------------------------------------------
# User errors: one line, non-zero exit, before any work
# --------------------------------------------------------------------------------------------------------------
def error_cases(run, tmp):
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty, exist_ok=True)
    model, data, tok = run["out"], run["data"], run["tokenizers"]
    prompt = ["--prompt", "happy face", "--threads", "1"]
    cases = [
        # the cases of the issue
        (["train", "--data-dir", data], "--tokenizer-dir is required"),
        (["train", "--data-dir", data, "--tokenizer-dir", empty], "image_tokenizer/model.safetensors"),
        (["generate", "--model", model, "--out", os.path.join(tmp, "nodir", "grid.png"), *prompt],
         "does not exist"),
        (["generate", "--model", model, "--columns", "0", *prompt], "--columns: must be >= 1, got 0"),
        (["convert", empty, os.path.join(tmp, "converted")], "not a Show-o checkpoint folder"),
        # and their neighbours
        (["train", "--tokenizer-dir", tok], "--data-dir is required"),
        (["train", "--data-dir", os.path.join(tmp, "nodata"), "--tokenizer-dir", tok], "no such directory"),
        (["train", "--data-dir", data, "--tokenizer-dir", tok, "--batch-size", "3", "--micro-batch-size", "2"],
         "batch_size 3 must be a positive multiple of micro_batch_size 2"),
        (["train", "--model-overrides", "{bad"], "--model-overrides: not valid JSON"),
        (["train", "--model-preset", "huge"], "invalid choice: 'huge'"),
        (["generate", "--model", empty, *prompt], "not a pipeline directory"),
        (["generate", "--model", model, "--out", os.path.join(tmp, "grid"), *prompt], "image suffix"),
        (["generate", "--model", model, "--num-inference-steps", "0", *prompt], "must be >= 1"),
        (["generate", "--model", model, "--guidance-scale", "nan", *prompt], "must be >= 0"),
        (["generate", "--model", model, "--device", "tpu", *prompt], "--device 'tpu'"),
        (["ask", "--model", model, "--image", os.path.join(tmp, "nothing.png"), "--question", "Why?"],
         "no such file"),
        (["eval", "--model", model, "--data-dir", empty], "no index.jsonl"),
        (["eval", "--model", model], "--data-dir is required"),
        (["demo", "--threads", "-2"], "--threads: must be >= 0"),
    ]
    if not torch.cuda.is_available():
        cases.append((["generate", "--model", model, "--device", "cuda", *prompt], "--device cuda"))
    return cases


def test_every_user_error_is_one_line(run, tmp_path, capsys):
    for argv, message in error_cases(run, str(tmp_path)):
        try:
            code = main(argv)
        except SystemExit as e:  # argument errors exit from the parser
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code != 0, argv
        assert "Traceback" not in err and len(err.splitlines()) == 1, (argv, err)
        assert err.startswith(f"unif2ace {argv[0]}: error: ") and message in err, (argv, err)
    assert not os.path.exists(str(tmp_path / "converted"))


def test_pipeline_errors_in_python(run):
    from unif2ace import FacePipeline

    pipe = FacePipeline.from_pretrained(run["out"])
    with pytest.raises(ValueError, match="prompt: expected a caption or a non-empty list"):
        pipe.generate([])
    with pytest.raises(FileNotFoundError, match="not a pipeline directory"):
        FacePipeline.from_pretrained(run["data"])


def test_debug_shows_the_traceback(run, tmp_path):
    with pytest.raises(UserError, match="--tokenizer-dir is required"):
        main(["train", "--data-dir", run["data"], "--debug"])


def test_unexpected_errors_name_their_type(run, monkeypatch, capsys):
    import unif2ace.pipeline

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(unif2ace.pipeline.FacePipeline, "caption", broken)
    image = os.path.join(run["data"], "images", "000000.png")
    assert main(["caption", "--model", run["out"], "--image", image]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "unif2ace caption: error: KeyError: 'boom' (rerun with --debug for the traceback)"


# --------------------------------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------------------------------
def command_parsers():
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices


def test_every_option_has_help_and_shows_its_default():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not fields - set(TRAIN_HELP), f"TrainConfig fields without help in cli.TRAIN_HELP: {fields - set(TRAIN_HELP)}"
    assert not set(TRAIN_HELP) - fields, f"help for fields TrainConfig does not have: {set(TRAIN_HELP) - fields}"
    for name, sub in command_parsers().items():
        for action in sub._actions:
            if action.option_strings and action.help != "==SUPPRESS==" and action.dest != "help":
                assert action.help, (name, action.option_strings)
        text = sub.format_help()
        assert "--threads" in text and "--debug" in text, name
        if name != "convert":
            assert "--no-progress" in text, name
    train = command_parsers()["train"].format_help()
    assert "(default: 1000)" in " ".join(train.split())                       # --steps
    assert "{tiny,small,medium,paper}" in train and "{auto,bf16,fp32}" in train
    generate = " ".join(command_parsers()["generate"].format_help().split())
    assert "faces per prompt (default: 4)" in generate
    assert "--guidance " not in generate and "--steps " not in generate        # old spellings are hidden
