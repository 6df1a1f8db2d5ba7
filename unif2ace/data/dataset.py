"""`FaceDataset`: one `torch.utils.data.Dataset` over the synthetic folder format and UniF²aceD-1M-style data.

Accepted layouts (see docs/data.md):

1. The folder format written by `write_synthetic_dataset`: `root/index.jsonl` (+ `schema.json`, `images/`).
2. A folder of image files plus one or more annotation files (`*.jsonl`, or `*.json` holding a list of
   records, a dict with a "data"/"annotations"/"records"/"images" list, or a dict image-name -> record).
   Pass `annotations=` to name the files explicitly, otherwise every *.json/*.jsonl at the top of `root`
   (except schema.json / config.json / tokenizer*.json) is read.

Field names are matched liberally (first match wins):

    image      image, image_path, img_path, img, file_name, filename, file, path
    caption    caption, text, description, prompt, captions (a list: the first non-empty entry)
    vqa        vqa, qa, qas, qa_pairs, questions, conversations
               items {question|q|query|prompt, answer|a|response|output}, or LLaVA-style
               conversations [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]
    identity   identity, identity_id, person_id, id_name, subject
    split      split ("val"/"valid" mean "validation")
    attributes attributes, attrs, labels (a dict; the real data set has none)

Image paths are relative to `image_root` (default: the directory of the annotation file, then `root`).

Problems never stop a run: a record whose image file is missing, or (with `require_caption=True`) whose
caption is empty, is dropped with one summarising `warnings.warn`; a record without any text (no caption
and no VQA pair) is always dropped; an image that fails to decode in `__getitem__` is warned about and
the next good record is returned instead (pass `verify_images=True` to decode every image up front and drop
corrupt ones at construction).
"""
from __future__ import annotations

import glob
import json
import os
import warnings

import numpy as np
import torch
from PIL import Image

IMAGE_KEYS = ("image", "image_path", "img_path", "img", "file_name", "filename", "file", "path")
CAPTION_KEYS = ("caption", "text", "description", "prompt", "captions")
VQA_KEYS = ("vqa", "qa", "qas", "qa_pairs", "questions", "conversations")
QUESTION_KEYS = ("question", "q", "query", "prompt")
ANSWER_KEYS = ("answer", "a", "response", "output")
IDENTITY_KEYS = ("identity", "identity_id", "person_id", "id_name", "subject")
ATTRIBUTE_KEYS = ("attributes", "attrs", "labels")
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation"}
_SKIP_JSON = {"schema.json", "config.json", "tokenizer.json", "tokenizer_config.json"}


def _first(record: dict, keys):
    for k in keys:
        if k in record and record[k] is not None:
            return record[k]
    return None


def _text(value) -> str:
    if isinstance(value, list):  # several captions: the first non-empty one
        value = next((v for v in value if isinstance(v, str) and v.strip()), "")
    return value.strip() if isinstance(value, str) else ""


def parse_vqa(value) -> list[dict]:
    """Normalise a VQA field into [{"question", "answer", ...}], accepting the layouts listed above."""
    if not isinstance(value, list):
        return []
    if value and isinstance(value[0], dict) and "from" in value[0]:  # LLaVA conversation turns
        pairs, question = [], None
        for turn in value:
            who, text = str(turn.get("from", "")).lower(), _text(turn.get("value", ""))
            text = text.replace("<image>", "").strip()
            if who in ("human", "user"):
                question = text
            elif who in ("gpt", "assistant") and question is not None:
                pairs.append({"question": question, "answer": text})
                question = None
        return [p for p in pairs if p["question"] and p["answer"]]
    out = []
    for item in value:
        if isinstance(item, dict):
            q, a = _text(_first(item, QUESTION_KEYS)), _text(_first(item, ANSWER_KEYS))
            extra = {k: v for k, v in item.items() if k not in QUESTION_KEYS + ANSWER_KEYS}
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            q, a, extra = _text(item[0]), _text(item[1]), {}
        else:
            continue
        if q and a:
            out.append({"question": q, "answer": a, **extra})
    return out


def read_annotation_file(path: str) -> list[dict]:
    """Records of one .jsonl or .json annotation file (see the module docstring for accepted shapes)."""
    if path.endswith(".jsonl"):
        records = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        warnings.warn(f"{path}:{n}: skipping a line that is not JSON ({e})")
        return records
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict):
        for key in ("data", "annotations", "records", "images"):
            if isinstance(data.get(key), list):
                return data[key]
        # {"img.jpg": {...}, ...}: the key is the image name
        return [{"image": k, **v} if isinstance(v, dict) else {"image": k, "caption": v} for k, v in data.items()]
    if isinstance(data, list):
        return data
    raise ValueError(f"{path}: expected a list or a dict of records, got {type(data).__name__}")


def image_to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """RGB, shorter side resized to image_size (bicubic), centre crop, [3, S, S] float in [-1, 1]."""
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (image_size, image_size):
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class FaceDataset(torch.utils.data.Dataset):
    """Face images with captions, VQA pairs and (synthetic only) attribute labels.

    Each item is a dict: `image` float [3, S, S] in [-1, 1], `caption` str, `vqa` list of
    {"question", "answer", ...}, `attributes` dict[str, str] (empty when the data has none),
    `identity` int (-1 if unknown; string ids are numbered in order of appearance), `path` str.
    Batch items with `collate_faces`.
    """

    def __init__(self, root: str, split: str | None = None, image_size: int = 64, *,
                 annotations: str | list[str] | None = None, image_root: str | None = None,
                 require_caption: bool = False, verify_images: bool = False):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data root {root!r} is not a directory")
        self.root, self.image_size = root, image_size
        self.split = SPLIT_ALIASES.get(split, split) if split is not None else None
        files = self._annotation_files(root, annotations)
        if not files:
            raise FileNotFoundError(f"no annotation files (index.jsonl, *.jsonl, *.json) found in {root!r}")
        self.records: list[dict] = []
        self._identity_ids: dict[str, int] = {}
        dropped = {"missing image": [], "no image field": [], "no text": [], "empty caption": [], "corrupt image": []}
        saw_split = False
        for path in files:
            base = image_root or os.path.dirname(os.path.abspath(path))
            for raw in read_annotation_file(path):
                if not isinstance(raw, dict):
                    continue
                if "split" in raw:
                    saw_split = True
                    if self.split is not None and SPLIT_ALIASES.get(raw["split"], raw["split"]) != self.split:
                        continue
                rec = self._normalise(raw, base)
                if rec is None:
                    dropped["no image field"].append(str(raw)[:60])
                elif not os.path.isfile(rec["path"]):
                    dropped["missing image"].append(rec["path"])
                elif not rec["caption"] and not rec["vqa"]:
                    dropped["no text"].append(rec["path"])
                elif require_caption and not rec["caption"]:
                    dropped["empty caption"].append(rec["path"])
                elif verify_images and not self._decodes(rec["path"]):
                    dropped["corrupt image"].append(rec["path"])
                else:
                    self.records.append(rec)
        if self.split is not None and not saw_split:
            raise ValueError(f"split={split!r} requested but the records of {root!r} have no 'split' field; "
                             "use split=None")
        for why, items in dropped.items():
            if items:
                warnings.warn(f"FaceDataset({root!r}): skipped {len(items)} record(s) with {why}, e.g. {items[:3]}")
        self._bad: set[int] = set()

    @staticmethod
    def _annotation_files(root, annotations) -> list[str]:
        if annotations is not None:
            files = [annotations] if isinstance(annotations, str) else list(annotations)
            return [f if os.path.isabs(f) or os.path.exists(f) else os.path.join(root, f) for f in files]
        if os.path.isfile(os.path.join(root, "index.jsonl")):
            return [os.path.join(root, "index.jsonl")]
        found = sorted(glob.glob(os.path.join(root, "*.jsonl")) + glob.glob(os.path.join(root, "*.json")))
        return [f for f in found if os.path.basename(f) not in _SKIP_JSON]

    def _normalise(self, raw: dict, base: str) -> dict | None:
        image = _first(raw, IMAGE_KEYS)
        if not isinstance(image, str) or not image:
            return None
        path = image if os.path.isabs(image) else os.path.join(base, image)
        if not os.path.isfile(path) and not os.path.isabs(image):
            path = os.path.join(self.root, image) if os.path.isfile(os.path.join(self.root, image)) else path
        ident = _first(raw, IDENTITY_KEYS)
        if isinstance(ident, bool) or ident is None:
            ident = -1
        elif not isinstance(ident, int):
            ident = self._identity_ids.setdefault(str(ident), len(self._identity_ids))
        attrs = _first(raw, ATTRIBUTE_KEYS)
        return {"path": path, "caption": _text(_first(raw, CAPTION_KEYS)), "vqa": parse_vqa(_first(raw, VQA_KEYS)),
                "attributes": {str(k): str(v) for k, v in attrs.items()} if isinstance(attrs, dict) else {},
                "identity": ident}

    @staticmethod
    def _decodes(path: str) -> bool:
        try:
            with Image.open(path) as im:
                im.load()
            return True
        except Exception:
            return False

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(index)
        index %= n
        for k in range(n):  # on a corrupt image, warn and move on to the next good record
            i = (index + k) % n
            if i in self._bad:
                continue
            rec = self.records[i]
            try:
                with Image.open(rec["path"]) as im:
                    image = image_to_tensor(im, self.image_size)
            except Exception as e:  # PIL raises several types for broken files
                self._bad.add(i)
                warnings.warn(f"FaceDataset: cannot read image {rec['path']!r} ({type(e).__name__}: {e}); skipping it")
                continue
            return {"image": image, "caption": rec["caption"], "vqa": rec["vqa"], "attributes": rec["attributes"],
                    "identity": rec["identity"], "path": rec["path"]}
        raise RuntimeError("FaceDataset: no readable image left")


def collate_faces(batch: list[dict]) -> dict:
    """Stack images to [B, 3, S, S] and identities to a LongTensor; keep text fields as lists."""
    return {"image": torch.stack([b["image"] for b in batch]),
            "identity": torch.tensor([b["identity"] for b in batch], dtype=torch.long),
            **{k: [b[k] for b in batch] for k in ("caption", "vqa", "attributes", "path")}}
