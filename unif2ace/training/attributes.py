"""Training the attribute classifier (`unif2ace.model.encoders.AttributeClassifier`) on labelled faces.

One recipe, two uses, two separately trained networks:
* the judge of generated faces (`unif2ace.evaluation`), trained on the train and validation splits;
* the demo's Face encoder (`FaceAttributeEncoder`, the sequence MoE's Face expert reads its feature), trained on the
  train split with another seed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unif2ace.data import SCHEMA
from unif2ace.model.encoders import AttributeClassifier
from unif2ace.progress import progress_bar

ATTRIBUTES = list(SCHEMA)
NUM_VALUES = {a: len(v) for a, v in SCHEMA.items()}


def label_tensor(records: list[dict]) -> Tensor:
    """[N, A] value indices, −100 where the attribute is hidden in the render (cannot be judged)."""
    out = torch.full((len(records), len(ATTRIBUTES)), -100, dtype=torch.long)
    for i, r in enumerate(records):
        hidden = set(r.get("hidden", ()))
        for j, a in enumerate(ATTRIBUTES):
            if a in r["attributes"] and a not in hidden:
                out[i, j] = SCHEMA[a].index(r["attributes"][a])
    return out


def random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """The batch moved by up to `shift` pixels in each direction (edges replicated): the renderer places faces
    with small offsets already, and the classifier must not depend on exact pixel positions."""
    if shift <= 0:
        return x
    s = x.shape[-1]
    x = F.pad(x, (shift,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()
    return x[:, :, dy:dy + s, dx:dx + s]


def train_attribute_classifier(images: Tensor, labels: Tensor, *, steps: int = 600, batch_size: int = 64,
                               lr: float = 3e-3, width: int = 16, shift: int = 2, seed: int = 0,
                               progress: bool = True, desc: str = "attribute classifier") -> AttributeClassifier:
    """AdamW with a one-cycle schedule on random batches of (images [N, 3, S, S] in [−1, 1], labels [N, A] from
    `label_tensor`), summed cross-entropy over the attributes (hidden ones ignored); shifted and noised inputs."""
    if images.dim() != 4 or images.shape[0] != labels.shape[0] or labels.shape[1:] != (len(ATTRIBUTES),):
        raise ValueError(f"images [N, 3, S, S] and labels [N, {len(ATTRIBUTES)}] expected, got "
                         f"{list(images.shape)} and {list(labels.shape)}")
    if images.shape[0] == 0:
        raise ValueError("train_attribute_classifier: no images")
    torch.manual_seed(seed)
    # channels-last convolutions are ~20 % faster on the CPU (oneDNN); the returned model is contiguous again
    model = AttributeClassifier(NUM_VALUES, images.shape[-1], width=width).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    bar = progress_bar(range(steps), desc=desc, disable=not progress)
    for _ in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x, y = random_shift(images[idx], shift, g), labels[idx]
        x = (x + 0.03 * torch.randn(x.shape, generator=g)).contiguous(memory_format=torch.channels_last)
        _, logits = model(x)
        loss = sum(F.cross_entropy(logits[a], y[:, j], ignore_index=-100) for j, a in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item() / len(ATTRIBUTES):.3f}")
    return model.to(memory_format=torch.contiguous_format).eval()
