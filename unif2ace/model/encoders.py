"""Frozen image encoders feeding the CLIP and Face experts of the sequence MoE.

An encoder is any nn.Module mapping images [B, 3, H, W] in [-1, 1] to embeddings [B, D]. Real ones (a CLIP image
tower, a face-recognition network) are passed to UniF2aceModel by the user. Without them the model uses
`BuiltinImageEncoder`: a tiny conv net with *random, fixed* weights (drawn from a fixed seed, so every instance
and every process gets the same weights). Honestly stated: its embeddings are random projections of local image
statistics — deterministic and image-dependent, but with no semantic or identity knowledge. It exists so that the
whole model, including the CLIP/Face experts, runs and trains end to end without external downloads.

`FaceAttributeEncoder` is a trained one: the feature of an `AttributeClassifier` (a small CNN trained to predict
face attributes from pixels, `unif2ace.training.attributes`), the demo's stand-in for a pretrained face-analysis
network. It reads the attributes that are one or two pixels wide (eye colour, lipstick, emotion) from the image
itself, where the image tokens lose them. It saves and loads as a pipeline component (`face_encoder/`:
config.json + model.safetensors).

Encoders are frozen (requires_grad False, eval mode), excluded from the parameter count, the optimizer and the
model checkpoint (a pipeline saves a `FaceAttributeEncoder` in its own folder).
"""
from __future__ import annotations

import json
import os

import torch
from torch import Tensor, nn

FEATURE_DIM = 64


class BuiltinImageEncoder(nn.Module):
    """Conv(3→32, 8×8 stride 8) → GELU → 2×2 average pool → Linear(128 → D) → LayerNorm (no affine)."""

    def __init__(self, embed_dim: int, seed: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.conv = nn.Conv2d(3, 32, kernel_size=8, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.proj = nn.Linear(32 * 4, embed_dim)
        self.norm = nn.LayerNorm(embed_dim, elementwise_affine=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        if self.conv.weight.is_meta:
            return
        g = torch.Generator(device="cpu").manual_seed(seed)
        for p in self.parameters():  # drawn on the CPU whatever the default device, so every device gets the same
            p.copy_(torch.randn(p.shape, generator=g, device="cpu") / max(1, p[0].numel()) ** 0.5)

    def forward(self, images: Tensor) -> Tensor:
        x = torch.nn.functional.gelu(self.conv(images))
        return self.norm(self.proj(self.pool(x).flatten(1)))


class AttributeClassifier(nn.Module):
    """A small all-convolutional net at full pixel resolution → Linear to a 64-d feature → one linear head per
    attribute (`num_values`: {attribute: number of values}).

    A 3×3 stem at full resolution (fine attributes — eye colour, brows, lipstick — span a few pixels at 32 px, a
    stride-2 first layer loses them), then three stages of (stride-2 conv, conv), each conv with BatchNorm and GELU,
    down to a 4 × 4 map (for 32 px inputs)."""

    def __init__(self, num_values: dict, image_size: int = 64, width: int = 16):
        super().__init__()

        def conv(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]

        w = width
        self.convs = nn.Sequential(*conv(3, w, 1), *conv(w, 2 * w, 2), *conv(2 * w, 2 * w, 1),
                                   *conv(2 * w, 4 * w, 2), *conv(4 * w, 4 * w, 1), *conv(4 * w, 4 * w, 2))
        side = max(1, image_size // 8)
        self.image_size, self.width, self.num_values = image_size, width, {a: int(n) for a, n in num_values.items()}
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * side * side, FEATURE_DIM), nn.GELU())
        self.heads = nn.ModuleDict({a: nn.Linear(FEATURE_DIM, n) for a, n in self.num_values.items()})

    def features(self, images: Tensor) -> Tensor:
        return self.feature(self.convs(images))

    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        f = self.features(images)
        return f, {a: head(f) for a, head in self.heads.items()}

    def settings(self) -> dict:
        return {"image_size": self.image_size, "width": self.width, "num_values": self.num_values}


class FaceAttributeEncoder(nn.Module):
    """The Face expert's encoder: a trained AttributeClassifier's 64-d feature, LayerNorm-ed (no affine) like the
    built-in encoder's output. Always in eval mode (BatchNorm uses its running statistics even when the model
    around it trains)."""

    def __init__(self, classifier: AttributeClassifier):
        super().__init__()
        self.classifier = classifier
        self.embed_dim = FEATURE_DIM
        self.norm = nn.LayerNorm(FEATURE_DIM, elementwise_affine=False)
        self.train(False)

    def train(self, mode: bool = True) -> "FaceAttributeEncoder":
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W], got {list(images.shape)}")
        return self.norm(self.classifier.features(images))

    def save_pretrained(self, directory: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"encoder": "attribute_classifier", "embed_dim": self.embed_dim,
                       **self.classifier.settings()}, f, indent=1)
        state = {k: v.detach().contiguous().cpu() for k, v in self.classifier.state_dict().items()}
        save_file(state, os.path.join(directory, "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str) -> "FaceAttributeEncoder":
        from safetensors.torch import load_file

        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{directory!r}: no face encoder here (config.json is missing)")
        with open(config_path) as f:
            config = json.load(f)
        if config.get("encoder") != "attribute_classifier":
            raise ValueError(f"{config_path}: unknown encoder {config.get('encoder')!r}")
        classifier = AttributeClassifier(config["num_values"], config["image_size"], width=config["width"])
        state = load_file(os.path.join(directory, "model.safetensors"))
        missing, unexpected = classifier.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory}: face encoder weights do not match its config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return freeze(cls(classifier))


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
