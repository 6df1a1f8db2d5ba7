"""Evaluation on held-out synthetic faces (`unif2ace eval`).

Four numbers, each printed beside a reference or baseline so it can be judged:

* generation attribute accuracy — a small CNN attribute classifier (one head per schema attribute, trained on
  rendered train-split images) judges each generated face on every attribute its prompt (a held-out short caption)
  states. Beside it: the classifier's accuracy on the real held-out images of those captions (the ceiling this
  judge allows), chance (1/number of values, averaged over the judged attributes) and the majority-value rate.
* Fréchet distance between generated and real held-out faces in the classifier's 64-d feature space; beside it the
  distance between two disjoint halves of real held-out faces (real vs real, same sample sizes).
* understanding: exact match of greedy answers on held-out VQA pairs (answers lower-cased, punctuation dropped);
  beside it the majority answer per question type (what / yesno / count / describe) and, stronger, the majority
  answer per question text, both fitted on the train split.
* caption attribute recall — the share of the attributes of the image's short caption whose phrase (with the right
  value) appears in the generated caption; beside it the recall of one fixed caption made of the train split's
  most frequent value of every attribute.

Held-out = the "test" split (identities never seen in training). Results go to a Markdown table and a JSON file.
"""
from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unif2ace.data import SCHEMA
from unif2ace.progress import progress_bar
from unif2ace.training.data import caption_attributes, mentions, normalize_answer, short_caption

ATTRIBUTES = list(SCHEMA)
FEATURE_DIM = 64


# ----------------------------------------------------------------------------------------------------------
# The attribute classifier (the judge of generated faces)
# ----------------------------------------------------------------------------------------------------------
class AttributeClassifier(nn.Module):
    """Four stride-2 conv blocks → Linear to a 64-d feature → one linear head per schema attribute."""

    def __init__(self, image_size: int = 64, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 3 * width, 4 * width]
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        side = max(1, image_size // 16)
        self.image_size = image_size
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * side * side, FEATURE_DIM), nn.GELU())
        self.heads = nn.ModuleDict({a: nn.Linear(FEATURE_DIM, len(v)) for a, v in SCHEMA.items()})

    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        f = self.feature(self.convs(images))
        return f, {a: head(f) for a, head in self.heads.items()}


def label_tensor(records: list[dict]) -> Tensor:
    """[N, A] value indices, −100 where the attribute is hidden in the render (cannot be judged)."""
    out = torch.full((len(records), len(ATTRIBUTES)), -100, dtype=torch.long)
    for i, r in enumerate(records):
        hidden = set(r.get("hidden", ()))
        for j, a in enumerate(ATTRIBUTES):
            if a in r["attributes"] and a not in hidden:
                out[i, j] = SCHEMA[a].index(r["attributes"][a])
    return out


def load_split(data_dir: str, split: str, image_size: int, limit: int = 0) -> tuple[Tensor, list[dict]]:
    """Images [N, 3, S, S] in [−1, 1] and the raw index records of one split (first `limit` if > 0)."""
    from PIL import Image

    from unif2ace.data.dataset import image_to_tensor

    with open(os.path.join(data_dir, "index.jsonl")) as f:
        records = [r for r in map(json.loads, f) if r.get("split") == split]
    if limit:
        records = records[:limit]
    images = []
    for r in records:
        with Image.open(os.path.join(data_dir, r["image"])) as im:
            images.append(image_to_tensor(im, image_size))
    return torch.stack(images) if images else torch.zeros(0, 3, image_size, image_size), records


def train_attribute_classifier(images: Tensor, labels: Tensor, *, steps: int = 600, batch_size: int = 64,
                               lr: float = 3e-3, seed: int = 0, progress: bool = True) -> AttributeClassifier:
    torch.manual_seed(seed)
    model = AttributeClassifier(images.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    bar = progress_bar(range(steps), desc="attribute classifier", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x, y = images[idx], labels[idx]
        # light augmentation: the judge must not depend on exact pixels of the renderer
        x = x + 0.05 * torch.randn(x.shape, generator=g)
        _, logits = model(x)
        loss = sum(F.cross_entropy(logits[a], y[:, j], ignore_index=-100) for j, a in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item() / len(ATTRIBUTES):.3f}")
    return model.eval()


@torch.no_grad()
def classify(model: AttributeClassifier, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """(features [N, 64], predicted value indices [N, A])."""
    feats, preds = [], []
    for i in range(0, images.shape[0], batch_size):
        f, logits = model(images[i:i + batch_size])
        feats.append(f)
        preds.append(torch.stack([logits[a].argmax(-1) for a in ATTRIBUTES], dim=1))
    return torch.cat(feats), torch.cat(preds)


def save_classifier(model: AttributeClassifier, path: str) -> None:
    tmp = path + ".tmp"
    torch.save({"image_size": model.image_size, "state": model.state_dict()}, tmp)
    os.replace(tmp, path)


def load_classifier(path: str) -> AttributeClassifier:
    blob = torch.load(path, map_location="cpu")
    model = AttributeClassifier(blob["image_size"])
    model.load_state_dict(blob["state"])
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------
def frechet_distance(a: Tensor, b: Tensor) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½) between two feature sets [N, D]."""
    import warnings

    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # few samples: Σ may be rank-deficient; sqrtm still gives the trace term
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(cov_a @ cov_b)
    covmean = (covmean[0] if isinstance(covmean, tuple) else covmean).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def attribute_agreement(preds: Tensor, records: list[dict]) -> tuple[float, float, float, int]:
    """Over every (image, attribute stated by its short caption): (accuracy of preds, chance, majority, pairs)."""
    hits, chance, pairs = 0, 0.0, 0
    for i, r in enumerate(records):
        for a, v in caption_attributes(r["attributes"]).items():
            j = ATTRIBUTES.index(a)
            hits += int(preds[i, j]) == SCHEMA[a].index(v)
            chance += 1.0 / len(SCHEMA[a])
            pairs += 1
    return hits / max(1, pairs), chance / max(1, pairs), 0.0, pairs


def majority_value_rate(train_records: list[dict], records: list[dict]) -> float:
    """Accuracy of always predicting the train split's most frequent value of each stated attribute."""
    counts: dict[str, Counter] = {a: Counter() for a in ATTRIBUTES}
    for r in train_records:
        for a, v in caption_attributes(r["attributes"]).items():
            counts[a][v] += 1
    hits = pairs = 0
    for r in records:
        for a, v in caption_attributes(r["attributes"]).items():
            hits += counts[a].most_common(1)[0][0] == v if counts[a] else 0
            pairs += 1
    return hits / max(1, pairs)


def vqa_baselines(train_records: list[dict], items: list[dict]) -> tuple[float, float]:
    """Exact match of the majority answer per question type and per question text (fitted on train)."""
    by_type: dict[str, Counter] = {}
    by_question: dict[str, Counter] = {}
    for r in train_records:
        for q in r["vqa"]:
            by_type.setdefault(q["type"], Counter())[normalize_answer(q["answer"])] += 1
            by_question.setdefault(q["question"], Counter())[normalize_answer(q["answer"])] += 1

    def rate(table, key) -> float:
        hits = 0
        for q in items:
            c = table.get(q[key])
            hits += bool(c) and c.most_common(1)[0][0] == normalize_answer(q["answer"])
        return hits / max(1, len(items))

    return rate(by_type, "type"), rate(by_question, "question")


def majority_caption(train_records: list[dict]) -> str:
    counts: dict[str, Counter] = {a: Counter() for a in ATTRIBUTES}
    for r in train_records:
        for a, v in r["attributes"].items():
            counts[a][v] += 1
    return short_caption({a: c.most_common(1)[0][0] for a, c in counts.items()})


# ----------------------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------------------
def evaluate(pipe, data_dir: str, *, out_dir: Optional[str] = None, classifier: Optional[AttributeClassifier] = None,
             classifier_steps: int = 600, num_generate: int = 64, num_vqa: int = 400, num_captions: int = 64,
             steps: int = 12, guidance_scale: float = 2.0, seed: int = 0, batch_size: int = 32,
             progress: bool = True) -> dict:
    """Runs every metric; writes eval.json and eval_table.md into out_dir (if given); returns the results."""
    t0 = time.time()
    size = pipe.model.config.image_size
    train_images, train_records = load_split(data_dir, "train", size)
    test_images, test_records = load_split(data_dir, "test", size)
    if not test_records:
        raise ValueError(f"{data_dir}: no test split records to evaluate on")
    clf_path = os.path.join(out_dir, "attribute_classifier.pt") if out_dir else ""
    if classifier is None and clf_path and os.path.exists(clf_path):
        classifier = load_classifier(clf_path)
    if classifier is None:
        classifier = train_attribute_classifier(train_images, label_tensor(train_records), steps=classifier_steps,
                                                seed=seed, progress=progress)
        if clf_path:
            os.makedirs(out_dir, exist_ok=True)
            save_classifier(classifier, clf_path)
    res: dict = {"num_train_images": len(train_records), "num_test_images": len(test_records)}

    # --- generation: prompts are the short captions of held-out faces (first half); real half 2 for FD ---
    rng = random.Random(seed)
    order = list(range(len(test_records)))
    rng.shuffle(order)
    n = min(num_generate, len(order) // 2)
    gen_idx, ref_idx = order[:n], order[n:2 * n]
    prompts = [short_caption(test_records[i]["attributes"]) for i in gen_idx]
    gen = []
    for i in progress_bar(range(0, n, batch_size), desc="eval: generate", disable=not progress):
        codes = pipe.generate_codes(prompts[i:i + batch_size], steps=steps, guidance_scale=guidance_scale,
                                    seed=seed + i)
        gen.append(pipe.decode_codes(codes).cpu())
    gen_images = torch.cat(gen)
    gen_feat, gen_pred = classify(classifier, gen_images)
    real_feat, real_pred = classify(classifier, test_images)
    gen_records = [test_records[i] for i in gen_idx]
    res["gen_attribute_accuracy"], res["chance"], _, res["gen_pairs"] = attribute_agreement(gen_pred, gen_records)
    res["classifier_accuracy_real"], _, _, _ = attribute_agreement(real_pred[gen_idx], gen_records)
    res["majority_value_rate"] = majority_value_rate(train_records, gen_records)
    res["fid_generated_vs_real"] = frechet_distance(gen_feat, real_feat[ref_idx])
    res["fid_real_vs_real"] = frechet_distance(real_feat[gen_idx], real_feat[ref_idx])
    res["generated"] = {"images": gen_images, "prompts": prompts, "records": gen_records}

    # --- understanding: held-out VQA ---
    items = [(i, q) for i, r in enumerate(test_records) for q in r["vqa"]]
    random.Random(seed + 1).shuffle(items)
    items = items[:num_vqa]
    answers = []
    for k in progress_bar(range(0, len(items), batch_size), desc="eval: answer", disable=not progress):
        chunk = items[k:k + batch_size]
        answers += pipe.answer_batch(test_images[[i for i, _ in chunk]], [q["question"] for _, q in chunk],
                                     max_new_tokens=16)
    hits = [normalize_answer(a) == normalize_answer(q["answer"]) for a, (_, q) in zip(answers, items)]
    res["vqa_accuracy"] = sum(hits) / max(1, len(hits))
    res["vqa_majority_per_type"], res["vqa_majority_per_question"] = vqa_baselines(train_records, [q for _, q in items])
    res["vqa_count"] = len(items)
    res["vqa_examples"] = [{"question": q["question"], "answer": a, "truth": q["answer"], "image": test_records[i]["image"]}
                           for a, (i, q) in zip(answers[:12], items[:12])]

    # --- captions ---
    cap_idx = order[:min(num_captions, len(order))]
    captions = []
    for k in progress_bar(range(0, len(cap_idx), batch_size), desc="eval: caption", disable=not progress):
        chunk = cap_idx[k:k + batch_size]
        captions += pipe.answer_batch(test_images[chunk], ["Describe the face."] * len(chunk), max_new_tokens=48)
    recall = [mentions(c, test_records[i]["attributes"]) for c, i in zip(captions, cap_idx)]
    res["caption_recall"] = sum(sum(m.values()) for m in recall) / max(1, sum(len(m) for m in recall))
    fixed = majority_caption(train_records)
    base = [mentions(fixed, test_records[i]["attributes"]) for i in cap_idx]
    res["caption_recall_majority"] = sum(sum(m.values()) for m in base) / max(1, sum(len(m) for m in base))
    res["caption_examples"] = [{"caption": c, "truth": short_caption(test_records[i]["attributes"])}
                               for c, i in zip(captions[:6], cap_idx[:6])]
    res["seconds"] = time.time() - t0
    if out_dir:
        write_results(res, out_dir)
    return res


def markdown_table(res: dict) -> str:
    r = res
    rows = [
        ("Generation attribute accuracy", f"{r['gen_attribute_accuracy']:.3f}",
         f"classifier on the real held-out faces: {r['classifier_accuracy_real']:.3f}",
         f"chance {r['chance']:.3f} (ratio {r['gen_attribute_accuracy'] / max(r['chance'], 1e-9):.2f}×); "
         f"majority value {r['majority_value_rate']:.3f}"),
        ("Fréchet distance (classifier features) ↓", f"{r['fid_generated_vs_real']:.2f}",
         f"real vs real: {r['fid_real_vs_real']:.2f}", ""),
        ("VQA exact match", f"{r['vqa_accuracy']:.3f}", "",
         f"majority per question type {r['vqa_majority_per_type']:.3f} (ratio "
         f"{r['vqa_accuracy'] / max(r['vqa_majority_per_type'], 1e-9):.2f}×); "
         f"majority per question {r['vqa_majority_per_question']:.3f}"),
        ("Caption attribute recall", f"{r['caption_recall']:.3f}", "",
         f"fixed majority caption {r['caption_recall_majority']:.3f}"),
    ]
    lines = ["| Metric | UniF²ace | Reference | Baseline |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines.append("")
    lines.append(f"{r['num_test_images']} held-out test faces (unseen identities); {r['gen_pairs']} judged "
                 f"(image, attribute) pairs over {len(r['generated']['prompts']) if 'generated' in r else '?'} "
                 f"generated faces; {r['vqa_count']} VQA pairs.")
    return "\n".join(lines) + "\n"


def write_results(res: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    plain = {k: v for k, v in res.items() if k != "generated"}
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(plain, f, indent=2)
    with open(os.path.join(out_dir, "eval_table.md"), "w") as f:
        f.write(markdown_table(res))
