"""FaceDataset over the synthetic folder format and UniF2aceD-1M-style folders, including broken records."""
import json
import warnings

import pytest
import torch
from PIL import Image

from unif2ace.data import FaceDataset, collate_faces, parse_vqa
from unif2ace.data.synthetic import SCHEMA, write_synthetic_dataset


def _img(path, size=(40, 30), color=(200, 10, 10), mode="RGB"):
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)


def test_synthetic_folder_splits(tmp_path):
    write_synthetic_dataset(str(tmp_path), 40, resolution=32, seed=0, progress=False)
    full = FaceDataset(str(tmp_path), image_size=32)
    parts = {s: FaceDataset(str(tmp_path), split=s, image_size=32) for s in ("train", "validation", "test")}
    assert sum(len(d) for d in parts.values()) == len(full) == 40
    assert len(FaceDataset(str(tmp_path), split="val")) == len(parts["validation"])
    item = parts["train"][0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert set(item["attributes"]) == set(SCHEMA) and len(item["vqa"]) >= 6 and item["caption"]
    ids = {d[i]["identity"] for d in parts.values() for i in range(len(d))}
    train_ids = {parts["train"][i]["identity"] for i in range(len(parts["train"]))}
    test_ids = {parts["test"][i]["identity"] for i in range(len(parts["test"]))}
    assert not train_ids & test_ids and len(ids) == 10
    batch = collate_faces([full[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["identity"].dtype == torch.long


def test_real_layout_jsonl_with_aliases_and_broken_records(tmp_path):
    (tmp_path / "imgs").mkdir()
    _img(tmp_path / "imgs" / "a.jpg", size=(80, 60))
    _img(tmp_path / "imgs" / "b.png", mode="L")  # greyscale is converted to RGB
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"not an image at all")
    _img(tmp_path / "imgs" / "empty.png")
    records = [
        {"image_path": "imgs/a.jpg", "text": "A woman with red hair.", "qa": [{"q": "Hair?", "a": "red"}], "id_name": "p7"},
        {"file_name": "imgs/b.png", "captions": ["", "A bald man."],
         "conversations": [{"from": "human", "value": "<image>\nIs he bald?"}, {"from": "gpt", "value": "Yes."}]},
        {"image": "imgs/missing.jpg", "caption": "gone"},
        {"image": "imgs/bad.jpg", "caption": "corrupt file"},
        {"image": "imgs/empty.png", "caption": ""},
        {"caption": "no image field"},
    ]
    with open(tmp_path / "faces.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    with pytest.warns(UserWarning) as caught:
        ds = FaceDataset(str(tmp_path), image_size=16)
    text = " ".join(str(w.message) for w in caught)
    assert "missing image" in text and "no text" in text and "no image field" in text
    assert len(ds) == 3  # a, b, bad (corrupt files are only found when read)
    a = ds[0]
    assert a["caption"] == "A woman with red hair." and a["vqa"] == [{"question": "Hair?", "answer": "red"}]
    assert a["image"].shape == (3, 16, 16) and a["identity"] == 0 and a["attributes"] == {}
    b = ds[1]
    assert b["caption"] == "A bald man." and b["vqa"] == [{"question": "Is he bald?", "answer": "Yes."}]
    assert b["identity"] == -1
    with pytest.warns(UserWarning, match="cannot read image"):
        c = ds[2]  # corrupt: warned, then the next good record (wraps to a) is returned
    assert c["caption"] == a["caption"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[2]  # already known bad: skipped silently
    with pytest.warns(UserWarning, match="corrupt image"):
        verified = FaceDataset(str(tmp_path), image_size=16, verify_images=True)
    assert len(verified) == 2


def test_real_layout_json_variants(tmp_path):
    _img(tmp_path / "x.png")
    _img(tmp_path / "y.png")
    json.dump({"annotations": [{"img": "x.png", "description": "first"}]}, open(tmp_path / "ann.json", "w"))
    json.dump({"y.png": "second"}, open(tmp_path / "more.json", "w"))
    ds = FaceDataset(str(tmp_path), image_size=8)
    assert sorted(ds[i]["caption"] for i in range(len(ds))) == ["first", "second"]
    only = FaceDataset(str(tmp_path), annotations="ann.json", image_size=8)
    assert len(only) == 1


def test_require_caption_and_split_errors(tmp_path):
    _img(tmp_path / "x.png")
    with open(tmp_path / "r.jsonl", "w") as f:
        f.write(json.dumps({"image": "x.png", "caption": "", "vqa": [{"question": "q", "answer": "a"}]}) + "\n")
        f.write("{broken json\n")
    with pytest.warns(UserWarning, match="not JSON"):
        assert len(FaceDataset(str(tmp_path))) == 1  # VQA-only record kept
    with pytest.warns(UserWarning, match="empty caption"):
        assert len(FaceDataset(str(tmp_path), require_caption=True)) == 0
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="split"):
        FaceDataset(str(tmp_path), split="train")
    with pytest.raises(ValueError, match="image_size"):
        FaceDataset(str(tmp_path), image_size=0)
    with pytest.raises(FileNotFoundError):
        FaceDataset(str(tmp_path / "nowhere"))


def test_parse_vqa_shapes():
    assert parse_vqa([["q1", "a1"], {"question": "q2", "answer": ""}, 3]) == [{"question": "q1", "answer": "a1"}]
    assert parse_vqa("not a list") == []
