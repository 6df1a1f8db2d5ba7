"""The trained Face encoder (FaceAttributeEncoder): what it computes, that it stays frozen in eval mode, that it
saves and loads as a pipeline component, that training and the pipeline carry it, and the tokenizer's perceptual
term built on it."""
import json
import os
import shutil

import pytest
import torch

from test_train_helpers import one_thread, tiny_config, tiny_setup  # noqa: F401  (one_thread: autouse fixture)
from unif2ace.model.encoders import FEATURE_DIM, AttributeClassifier, FaceAttributeEncoder
from unif2ace.training.attributes import ATTRIBUTES, NUM_VALUES, label_tensor, train_attribute_classifier


def _encoder(seed=0, width=4):
    torch.manual_seed(seed)
    net = AttributeClassifier(NUM_VALUES, 32, width=width)
    with torch.no_grad():  # running statistics other than (0, 1), so eval mode differs visibly from train mode
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return FaceAttributeEncoder(net)


def test_encoder_is_the_layer_normed_classifier_feature():
    enc = _encoder()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    y = enc(x)
    assert y.shape == (5, FEATURE_DIM)
    f = enc.classifier.eval().features(x)
    expected = (f - f.mean(-1, keepdim=True)) / torch.sqrt(f.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(y, expected)
    # rows are independent (eval-mode BatchNorm): one image alone gives its row of the batch
    torch.testing.assert_close(enc(x[2:3]), y[2:3])


def test_encoder_stays_in_eval_mode():
    enc = _encoder()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    before = enc(x)
    stats = [b.clone() for b in enc.classifier.buffers()]
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    torch.testing.assert_close(enc(x), before)
    assert all(torch.equal(a, b) for a, b in zip(stats, enc.classifier.buffers()))


def test_encoder_rejects_bad_images():
    enc = _encoder()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc(torch.zeros(2, 1, 32, 32))


def test_save_and_load_round_trip(tmp_path):
    enc = _encoder(seed=3)
    enc.save_pretrained(str(tmp_path / "fe"))
    assert json.load(open(tmp_path / "fe" / "config.json"))["num_values"] == NUM_VALUES
    back = FaceAttributeEncoder.from_pretrained(str(tmp_path / "fe"))
    assert not any(p.requires_grad for p in back.parameters()) and not back.training
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(back(x), enc(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        FaceAttributeEncoder.from_pretrained(str(tmp_path / "nothing"))
    other = _encoder(width=8)
    other.save_pretrained(str(tmp_path / "wide"))
    shutil.copy(tmp_path / "fe" / "config.json", tmp_path / "wide" / "config.json")
    with pytest.raises(Exception, match="size mismatch|do not match"):
        FaceAttributeEncoder.from_pretrained(str(tmp_path / "wide"))


def test_classifier_training_learns_a_visible_attribute(tmp_path):
    """A few hundred steps on 64 faces fit the training labels of the background (a large, flat region) far
    above chance: the recipe trains what it is given."""
    from unif2ace.evaluation import classify, load_split

    paths = tiny_setup(str(tmp_path))
    images, recs = load_split(paths["data"], "train", 32)
    labels = label_tensor(recs)
    net = train_attribute_classifier(images, labels, steps=150, width=8, seed=0, progress=False)
    _, preds = classify(net, images)
    j = ATTRIBUTES.index("background")
    seen = labels[:, j] != -100
    acc = (preds[seen, j] == labels[seen, j]).float().mean().item()
    assert acc > 0.8, acc
    with pytest.raises(ValueError, match="labels"):
        train_attribute_classifier(images, labels[:, :3], steps=1, progress=False)


def test_training_uses_and_exports_the_face_encoder(tmp_path):
    """A tokenizer dir with face_encoder/: the model is built on it (its embedding size, "external" in the
    config), the token cache holds its embeddings, and the exported pipeline carries it and loads it back."""
    from unif2ace.pipeline import FacePipeline
    from unif2ace.training import train

    root = str(tmp_path)
    paths = tiny_setup(root)
    tok = os.path.join(root, "tok_with_face")
    shutil.copytree(paths["tokenizers"], tok)
    enc = _encoder(seed=5)
    enc.save_pretrained(os.path.join(tok, "face_encoder"))
    out = os.path.join(root, "run")
    cfg = tiny_config(root, out, tokenizer_dir=tok, cache_dir=os.path.join(root, "cache_face"), steps=2,
                      checkpoint_every=100)
    result = train(cfg)
    model = result["model"]
    assert isinstance(model.face_encoder, FaceAttributeEncoder)
    assert model.config.face_encoder == "external" and model.config.face_embed_dim == FEATURE_DIM
    assert not model.face_encoder.training  # the training loop's model.train() leaves it in eval mode
    assert os.path.isfile(os.path.join(out, "face_encoder", "model.safetensors"))
    pipe = FacePipeline.from_pretrained(out)
    assert isinstance(pipe.model.face_encoder, FaceAttributeEncoder)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(pipe.model.face_encoder(x), enc(x), rtol=0, atol=0)
    emb = pipe.model.image_embeddings(2, torch.device("cpu"), images=x)
    torch.testing.assert_close(emb["face"], enc(x))
    # saved again by the pipeline itself, it still loads with the same encoder
    pipe.save_pretrained(os.path.join(root, "again"))
    again = FacePipeline.from_pretrained(os.path.join(root, "again"))
    torch.testing.assert_close(again.model.face_encoder(x), enc(x), rtol=0, atol=0)


def test_tokenizer_perceptual_term():
    from unif2ace.tokenizers import ImageTokenizerConfig, ImageTokenizerTrainConfig, train_image_tokenizer

    icfg = ImageTokenizerConfig(ch=8, enc_ch_mult=(1, 2), enc_num_res_blocks=(1, 1), dec_ch_mult=(1, 2),
                                dec_num_res_blocks=(1, 1), code_bits=4, norm_groups=4, mid_attn=False, image_size=32)
    images = torch.rand(16, 3, 32, 32) * 2 - 1
    tcfg = ImageTokenizerTrainConfig(batch_size=8, log_every=1)
    enc = _encoder()
    with_term, hist = train_image_tokenizer(images, icfg, 3, train=tcfg, perceptual=enc, perceptual_weight=0.5,
                                            progress=False)
    for row in hist:
        assert row["perceptual"] >= 0
        parts = row["recon"] + tcfg.commit_weight * row["commit"] + tcfg.entropy_weight * (
            row["entropy_sample"] - row["entropy_codebook"])
        assert row["loss"] == pytest.approx(parts + 0.5 * row["perceptual"], rel=1e-3, abs=1e-4)
    assert not any(p.requires_grad for p in enc.parameters())
    without, plain = train_image_tokenizer(images, icfg, 3, train=tcfg, progress=False)
    assert "perceptual" not in plain[0]
    # same seed and batches: the first step's losses differ by the term alone (the history rounds to 5 decimals),
    # and only the term's gradient can make the two tokenizers differ
    assert plain[0]["loss"] == pytest.approx(hist[0]["loss"] - 0.5 * hist[0]["perceptual"], rel=0, abs=2e-5)
    assert any(not torch.equal(a, b) for a, b in zip(with_term.parameters(), without.parameters()))
