"""FacePipeline's diffusers / transformers conventions on a tiny random pipeline: dtype and device, calling the
pipeline, generator and seed, num_inference_steps (and the older steps), negative_prompt, output types, the
generation config, progress options, greedy answers with do_sample, and UniF2aceConfig.from_pretrained."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_helpers import tiny_pipeline
from test_train_helpers import one_thread  # noqa: F401  (autouse fixture)
from unif2ace import FacePipeline, UniF2aceConfig
from unif2ace.pipeline import FacePipelineOutput, save_generation_config


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("pipe") / "pipeline")
    tiny_pipeline(p)
    return p


@pytest.fixture(scope="module")
def pipe(path):
    pipe = FacePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_issue_call_returns_pil_images(path):
    pipe = FacePipeline.from_pretrained(path, torch_dtype=torch.bfloat16).to("cpu")
    out = pipe("a prompt", num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, FacePipelineOutput)
    assert len(out.images) == 1 and all(isinstance(im, Image.Image) for im in out.images)
    assert out.images[0].size == (32, 32) and out.codes.shape == (1, 16)
    assert pipe.dtype == torch.bfloat16 and pipe.device == torch.device("cpu")
    assert next(pipe.image_tokenizer.parameters()).dtype == torch.float32  # the tokenizer stays fp32
    assert FacePipeline.from_pretrained(path, torch_dtype="bfloat16").dtype == torch.bfloat16
    assert FacePipeline.from_pretrained(path, torch_dtype="auto").dtype == torch.float32


def test_to_moves_and_casts(path):
    pipe = FacePipeline.from_pretrained(path)
    assert pipe.to(torch.bfloat16) is pipe and pipe.dtype == torch.bfloat16
    pipe.to("cpu", torch.float32)
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu"
    pipe.to(device="cpu", dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="floating-point"):
        pipe.to(torch.int64)


def test_generator_and_seed(pipe):
    a = pipe("happy face", num_inference_steps=3, generator=torch.Generator().manual_seed(7)).codes
    b = pipe("happy face", num_inference_steps=3, generator=torch.Generator().manual_seed(7)).codes
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    first = pipe("happy face", num_inference_steps=3, generator=g).codes
    second = pipe("happy face", num_inference_steps=3, generator=g).codes   # the generator has advanced
    assert torch.equal(first, a) and not torch.equal(first, second)
    # seed= is the sampler's Philox seed, exactly what the model's own generate_images takes
    ids = [pipe.text_tokenizer.encode("happy face")]
    direct = pipe.model.generate_images(ids, steps=3, guidance_scale=pipe.generation_config["guidance_scale"], seed=5)
    assert torch.equal(pipe("happy face", num_inference_steps=3, seed=5).codes, direct)
    with pytest.raises(ValueError, match="either seed"):
        pipe("happy face", seed=1, generator=torch.Generator())


def test_steps_is_an_alias(pipe):
    assert torch.equal(pipe("sad face", steps=3, seed=1).codes, pipe("sad face", num_inference_steps=3, seed=1).codes)
    with pytest.raises(ValueError, match="disagree"):
        pipe("sad face", steps=3, num_inference_steps=4)


def test_negative_prompt(pipe):
    # an untrained model barely reads its captions: a large guidance scale makes the difference visible
    ids = [pipe.text_tokenizer.encode(p) for p in ("happy face", "sad face")]
    neg = [pipe.text_tokenizer.encode("blue background")] * 2
    kw = dict(num_inference_steps=3, guidance_scale=100.0, seed=0)
    want = pipe.model.generate_images(ids, steps=3, guidance_scale=100.0, seed=0, negative_prompt_ids=neg)
    got = pipe(["happy face", "sad face"], negative_prompt="blue background", **kw).codes
    assert torch.equal(got, want)
    plain = pipe(["happy face", "sad face"], **kw).codes
    assert not torch.equal(got, plain)
    # the empty caption is the default unconditional prompt
    assert torch.equal(pipe(["happy face", "sad face"], negative_prompt="", **kw).codes, plain)
    with pytest.raises(ValueError, match="negative_prompt"):
        pipe(["happy face", "sad face"], negative_prompt=["a", "b", "c"])


def test_output_types_agree(pipe):
    kw = dict(num_images_per_prompt=2, num_inference_steps=2, seed=3)
    pil = pipe("happy face", **kw).images
    pt = pipe("happy face", output_type="pt", **kw).images
    arr = pipe("happy face", output_type="np", **kw).images
    assert pt.shape == (2, 3, 32, 32) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    assert arr.shape == (2, 32, 32, 3) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), np.round(arr * 255).astype(np.uint8))
    (tuple_images,) = pipe("happy face", return_dict=False, **kw)
    assert len(tuple_images) == 2
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pipe.generate("happy face", **kw), pil))
    with pytest.raises(ValueError, match="output_type"):
        pipe("happy face", output_type="latent")


def test_bad_prompts(pipe):
    for bad in ([], None, [1]):
        with pytest.raises(ValueError, match="prompt"):
            pipe.generate(bad)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        pipe("x", num_images_per_prompt=0)
    with pytest.raises(FileNotFoundError, match="no-such.png"):
        pipe.answer("no-such.png", "What colour is the background?")
    with pytest.raises(ValueError, match="question"):
        pipe.answer(pipe("x", num_inference_steps=1).images[0], 3)


def test_generation_config_sets_the_defaults(path, tmp_path):
    copy = str(tmp_path / "pipe")
    FacePipeline.from_pretrained(path).save_pretrained(copy)
    save_generation_config(copy, num_inference_steps=3, guidance_scale=0.5, temperature=0.4)
    pipe = FacePipeline.from_pretrained(copy)
    assert pipe.generation_config == {"num_inference_steps": 3, "guidance_scale": 0.5, "temperature": 0.4}
    assert torch.equal(pipe("sad face", seed=2).codes,
                       pipe("sad face", num_inference_steps=3, guidance_scale=0.5, temperature=0.4, seed=2).codes)
    assert not torch.equal(pipe("sad face", seed=2).codes, pipe("sad face", temperature=1.0, seed=2).codes)
    # an older config without a temperature keeps the former default, 1.0
    with open(os.path.join(copy, "generation_config.json"), "w") as f:
        json.dump({"num_inference_steps": 3, "guidance_scale": 0.5}, f)
    assert FacePipeline.from_pretrained(copy).generation_config["temperature"] == 1.0
    with pytest.raises(ValueError, match="unknown keys"):
        save_generation_config(copy, guidance=1.0)


def test_progress_bar_config(pipe, capsys, monkeypatch):
    import unif2ace.progress as progress

    monkeypatch.setattr(progress, "MIN_SUMMARY_S", 0.0)  # report even this short loop
    pipe.set_progress_bar_config(desc="faces")
    pipe("x", num_inference_steps=2)
    assert "faces: done 2/2" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe("x", num_inference_steps=2)
    assert capsys.readouterr().err == ""


def test_answers_are_greedy_unless_do_sample(pipe):
    from unif2ace.training.data import question_prompt

    image = pipe("happy face", num_inference_steps=2, output_type="pt").images * 2 - 1
    q = "What colour is the background?"
    greedy = pipe.answer(image, q)
    assert greedy == pipe.answer(image, q, do_sample=False, seed=9)  # the seed plays no part in greedy decoding
    codes = pipe.image_tokenizer.encode(image)
    ids = pipe.model.generate_text([pipe.text_tokenizer.encode(question_prompt(q))], image_codes=codes, images=image,
                                   max_new_tokens=48, top_k=1)
    assert greedy == pipe.text_tokenizer.decode(ids[0]).strip()
    sampled = [pipe.answer(image, q, do_sample=True, seed=s, max_new_tokens=8) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]
    assert isinstance(pipe.caption(image), str)


def test_config_from_pretrained_and_model_type(path, tmp_path):
    model_dir = os.path.join(path, "model")
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    assert raw["model_type"] == "unif2ace"
    config = UniF2aceConfig.from_pretrained(model_dir)
    assert config == FacePipeline.from_pretrained(path).model.config
    assert UniF2aceConfig.from_pretrained(os.path.join(model_dir, "config.json")) == config
    old = {k: v for k, v in raw.items() if k != "model_type"}  # written before model_type existed
    assert UniF2aceConfig.from_dict(old) == config
    with pytest.raises(ValueError, match="model_type"):
        UniF2aceConfig.from_dict({**raw, "model_type": "phi"})
