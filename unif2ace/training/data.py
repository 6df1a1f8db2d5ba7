"""Training data: tokenised faces, the image-token cache and the deterministic batch order.

* `short_caption(attributes)` — the compact caption form used on synthetic data (caption_form="short"): a fixed-order
  list of the key visible attributes, e.g. "happy face, tan skin, short black hair, blue eyes, round glasses,
  no hat, no beard, blue background". Short, regular captions let a few-M-parameter model learn text-to-face on a
  CPU in minutes; caption_form="full" trains on the data set's own captions (the real data has no attributes).
* `TokenizedFaces` — image codes (from the image tokenizer), frozen CLIP/Face embeddings, caption token ids and
  VQA token ids of one split. `TokenizedFaces.build` caches codes and embeddings in one tensor file keyed by a
  hash of the data set records, the image tokenizer's weights and the encoders, so they are computed once.
* `BatchOrder` — which samples form micro-batch m of step s: a pure function of (seed, s, m), so a resumed run
  sees exactly the batches an uninterrupted one would. Each stream walks a fresh seeded permutation per epoch.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from unif2ace import durable
from unif2ace.model.batch import build_batch, understanding_length
from unif2ace.progress import progress_bar

CAPTION_QUESTION = "Describe the face."


# ----------------------------------------------------------------------------------------------------------
# Caption and prompt text
# ----------------------------------------------------------------------------------------------------------
def _hidden(a: dict) -> set:
    hidden = set()
    if a.get("glasses") == "sunglasses":
        hidden |= {"eye_color"}
    if a.get("mask") == "yes":
        hidden |= {"beard", "lipstick"}
    return hidden


def caption_phrases(a: dict) -> list[tuple[str, str]]:
    """[(attribute, phrase)] of the short caption, in order. hair_length and hair_color share one phrase."""
    hidden = _hidden(a)
    out = [("emotion", f"{a['emotion']} face"), ("skin_tone", f"{a['skin_tone']} skin")]
    if a["hair_length"] == "bald":
        out.append(("hair_length", "bald"))
    else:
        out.append(("hair_length", f"{a['hair_length']} {a['hair_color']} hair"))
        out.append(("hair_color", f"{a['hair_length']} {a['hair_color']} hair"))
    if "eye_color" not in hidden:
        out.append(("eye_color", f"{a['eye_color']} eyes"))
    glasses = {"none": "no glasses", "sunglasses": "sunglasses"}.get(a["glasses"], f"{a['glasses']} glasses")
    out.append(("glasses", glasses))
    out.append(("hat", "no hat" if a["hat"] == "none" else "a " + a["hat"].replace("_", " ")))
    if "beard" not in hidden:
        beard = {"none": "no beard", "stubble": "stubble", "goatee": "a goatee", "full": "a full beard"}[a["beard"]]
        out.append(("beard", beard))
    if a["mask"] == "yes":
        out.append(("mask", "a face mask"))
    if "lipstick" not in hidden and a["lipstick"] != "none":
        out.append(("lipstick", f"{a['lipstick']} lipstick"))
    out.append(("background", f"{a['background']} background"))
    return out


def short_caption(attributes: dict) -> str:
    seen, parts = set(), []
    for _, phrase in caption_phrases(attributes):
        if phrase not in seen:
            seen.add(phrase)
            parts.append(phrase)
    return ", ".join(parts)


def caption_attributes(attributes: dict) -> dict:
    """{attribute: value} that the short caption of these attributes states."""
    return {name: attributes[name] for name, _ in caption_phrases(attributes)}


def mentions(caption: str, attributes: dict) -> dict:
    """{attribute: bool} for every attribute of the short caption: does `caption` state it with the right value?
    Each comma-separated item is compared with the attribute's phrase; the shared hair phrase is judged per part
    ("<length> … hair" for hair_length, "… <colour> hair" for hair_color)."""
    items = [p.strip() for p in caption.lower().split(",")]
    out = {}
    for name, phrase in caption_phrases(attributes):
        if name == "hair_length" and phrase != "bald":
            out[name] = any(i.startswith(attributes["hair_length"] + " ") and i.endswith(" hair") for i in items)
        elif name == "hair_color":
            out[name] = any(i.endswith(f" {attributes['hair_color']} hair") for i in items)
        else:
            out[name] = phrase in items
    return out


def question_prompt(question: str) -> str:
    return f"USER: {question} ASSISTANT:"


def normalize_answer(text: str) -> str:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).strip().replace("  ", " ")


# ----------------------------------------------------------------------------------------------------------
# Tokenised data and the token cache
# ----------------------------------------------------------------------------------------------------------
def tensor_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def dataset_hash(records: list[dict], image_size: int) -> str:
    h = hashlib.sha1(str(image_size).encode())
    for r in records:
        h.update(r["path"].encode())
        try:
            h.update(str(os.path.getmtime(r["path"])).encode())
        except OSError:
            pass
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_images(dataset, image_tokenizer, encoders: dict, *, batch_size: int = 64, device="cpu",
                  progress: bool = True, desc: str = "image tokens") -> dict[str, Tensor]:
    """{"codes": [N, T] int16/int32, "<name>": [N, D] float32 per encoder} over a FaceDataset."""
    out: dict[str, list] = {"codes": [], **{k: [] for k in encoders}}
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         collate_fn=lambda items: torch.stack([i["image"] for i in items]))
    image_tokenizer = image_tokenizer.to(device).eval()
    for images in progress_bar(loader, desc=desc, disable=not progress):
        images = images.to(device)
        out["codes"].append(image_tokenizer.encode(images).to(torch.int32).cpu())
        for k, enc in encoders.items():
            out[k].append(enc.to(device)(images).float().cpu())
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}


@dataclass
class TokenizedFaces:
    codes: Tensor                      # [N, T] int32 image codes
    embeddings: dict                   # {"clip": [N, Dc], "face": [N, Df]} frozen-encoder embeddings
    captions: list[list[int]]          # caption token ids per image
    vqa: list[tuple[int, list[int], list[int]]]  # (image index, prompt ids, answer ids), captioning included
    records: list[dict]                # the FaceDataset records (path, caption, vqa, attributes, ...)

    def __len__(self) -> int:
        return self.codes.shape[0]

    @classmethod
    def build(cls, dataset, image_tokenizer, text_tokenizer, encoders: dict, *, caption_form: str = "short",
              cache_dir: str = "", device="cpu", progress: bool = True) -> "TokenizedFaces":
        records = dataset.records
        key = "-".join([dataset_hash(records, dataset.image_size), tensor_hash(image_tokenizer),
                        *[f"{k}{tensor_hash(e)}" for k, e in sorted(encoders.items())]])
        path = os.path.join(cache_dir, f"tokens-{key}.pt") if cache_dir else ""
        arrays = None
        if path and os.path.exists(path):
            try:
                arrays = torch.load(path)
            except Exception as e:  # a cache file cut short (power loss) is rebuilt, not fatal
                warnings.warn(f"token cache {path} cannot be read ({e}); rebuilding it")
        if arrays is None:
            arrays = encode_images(dataset, image_tokenizer, encoders, device=device, progress=progress)
            if path:
                os.makedirs(cache_dir, exist_ok=True)
                tmp = durable.temporary_name(path)  # several runs may share a cache: each writes its own copy
                try:
                    durable.torch_save(arrays, tmp)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
        captions, vqa, cap_rows = [], [], []
        caption_prompt = text_tokenizer.encode(question_prompt(CAPTION_QUESTION))
        for i, r in enumerate(records):
            use_short = caption_form == "short" and r["attributes"]
            text = short_caption(r["attributes"]) if use_short else r["caption"]
            captions.append(text_tokenizer.encode(text))
            if text:  # captioning rows are understanding rows with the caption as the answer
                cap_rows.append((i, caption_prompt, text_tokenizer.encode(" " + text)))
            for item in r["vqa"]:
                vqa.append((i, text_tokenizer.encode(question_prompt(item["question"])),
                            text_tokenizer.encode(" " + item["answer"])))
        return cls(arrays["codes"], {k: v for k, v in arrays.items() if k != "codes"}, captions,
                   vqa + [("caption",) + row for row in cap_rows], records)

    @property
    def vqa_rows(self) -> list:
        return [r for r in self.vqa if r[0] != "caption"]

    @property
    def caption_rows(self) -> list:
        return [r[1:] for r in self.vqa if r[0] == "caption"]


# ----------------------------------------------------------------------------------------------------------
# Deterministic batch order
# ----------------------------------------------------------------------------------------------------------
def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so (seed, step, micro) give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class Stream:
    """Sample indices in [0, n): position p is element p % n of the permutation of epoch p // n."""

    def __init__(self, n: int, seed: int, name: int):
        self.n, self.seed, self.name = n, seed, name
        self._perms: dict[int, list[int]] = {}

    def take(self, start: int, count: int) -> list[int]:
        out = []
        for p in range(start, start + count):
            epoch, i = divmod(p, self.n)
            if epoch not in self._perms:
                if len(self._perms) > 4:
                    self._perms.clear()
                g = torch.Generator().manual_seed(mix_seed(self.seed, self.name, epoch))
                self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
            out.append(self._perms[epoch][i])
        return out


class BatchOrder:
    """Builds micro-batch m of step s (s counts optimizer steps, m in [0, micro_batches_per_step))."""

    def __init__(self, data: TokenizedFaces, model_config, *, micro_batch_size: int, micro_batches_per_step: int,
                 generation_fraction: float, caption_fraction: float, seed: int, vqa_row_tokens: int = 0):
        self.data, self.model_config, self.seed = data, model_config, seed
        self.vqa_row_tokens = vqa_row_tokens
        self.M = micro_batches_per_step
        self.n_gen = round(micro_batch_size * generation_fraction)
        n_und = micro_batch_size - self.n_gen
        self.vqa_rows, self.cap_rows = data.vqa_rows, data.caption_rows
        self.n_cap = round(n_und * caption_fraction) if self.cap_rows else 0
        self.n_vqa = n_und - self.n_cap if self.vqa_rows else 0
        if not self.vqa_rows:
            self.n_cap = n_und if self.cap_rows else 0
        if self.n_gen + self.n_cap + self.n_vqa == 0:
            raise ValueError("BatchOrder: the data has neither captions nor VQA pairs")
        self.vqa_of_image: dict[int, list[int]] = {}  # image index → its VQA rows (for multi-question rows)
        for j, (i, _, _) in enumerate(self.vqa_rows):
            self.vqa_of_image.setdefault(i, []).append(j)
        self.gen = Stream(len(data), seed, 1)
        self.vqa = Stream(max(1, len(self.vqa_rows)), seed, 2)
        self.cap = Stream(max(1, len(self.cap_rows)), seed, 3)

    def more_questions(self, j: int, step: int, micro: int) -> list[tuple[list[int], list[int]]]:
        """Further (prompt, answer) turns for VQA row j: the other questions about its image in a random order
        (drawn from (seed, step, micro, j)), taken while the row stays within vqa_row_tokens."""
        if self.vqa_row_tokens <= 0:
            return []
        i, prompt, answer = self.vqa_rows[j]
        others = [k for k in self.vqa_of_image[i] if k != j]
        g = torch.Generator().manual_seed(mix_seed(self.seed, step, micro, j, 13))
        turns, more = [(prompt, answer)], []
        for k in torch.randperm(len(others), generator=g).tolist():
            _, p, a = self.vqa_rows[others[k]]
            if understanding_length(self.model_config.num_image_tokens, turns + [(p, a)]) > self.vqa_row_tokens:
                continue
            turns.append((p, a))
            more.append((p, a))
        return more

    def micro_batch(self, step: int, micro: int) -> dict:
        d, c = self.data, self.model_config
        slot = step * self.M + micro
        picked = self.vqa.take(slot * self.n_vqa, self.n_vqa)
        und = [self.vqa_rows[j] + (self.more_questions(j, step, micro),) for j in picked]
        und += [self.cap_rows[j] + ((),) for j in self.cap.take(slot * self.n_cap, self.n_cap)]
        gen = self.gen.take(slot * self.n_gen, self.n_gen)
        g = torch.Generator().manual_seed(mix_seed(self.seed, step, micro, 7))
        batch = build_batch(
            c, understanding=[(d.codes[i].long(), p, a, more) for i, p, a, more in und],
            generation=[(d.captions[i], d.codes[i].long()) for i in gen], generator=g)
        rows = [row[0] for row in und]
        batch["embeddings"] = {k: torch.cat([v[rows], torch.zeros(len(gen), v.shape[1])]) for k, v in
                               d.embeddings.items()}
        return batch


def save_json(path: str, obj) -> None:
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def load_records_split(data_dir: str, split: Optional[str], image_size: int):
    from unif2ace.data import FaceDataset

    return FaceDataset(data_dir, split=split, image_size=image_size)
