"""Image tokenizer: a lookup-free-quantisation (LFQ) autoencoder in the MAGVIT-v2 style.

images [-1, 1] -> conv encoder -> b latent channels -> sign (+1 / -1, straight-through gradient)
-> code = sum_j bit_j * 2^(b-1-j)  (bit_j = latent_j > 0; channel 0 is the most significant bit)
-> codes [B, h*w] (row-major over the h x w latent grid) -> decoder -> images.

One module, `ImageTokenizer`, serves two purposes:

* the project's own small tokenizer (`ImageTokenizerConfig()`: 64x64 images, 8x down-sampling -> 8x8 = 64
  tokens, 10 bits -> 1024 codes, ch 16, ~0.8 M parameters, sized to train in CPU minutes), trained from scratch with `train_image_tokenizer` and stored with
  `save_pretrained` / `from_pretrained` (`config.json` + `model.safetensors`);
* Show-o's MAGVIT-v2 tokenizer (`ImageTokenizerConfig.showo_magvit2()`: ch 128, 16x down, 13 bits -> 8192
  codes): the sub-module names reproduce Show-o's state-dict keys exactly (`encoder.down.{l}.block.{b}.norm1`,
  `decoder.up.{l}.upsample.conv`, `quantize.embedding`, ...), so `load_magvit2(folder)` reads its
  `config.json` + `pytorch_model.safetensors` directly.

Architecture (taming-VQGAN style, no time embedding): GroupNorm(eps 1e-6) + swish + 3x3 conv residual blocks
(1x1 `nin_shortcut` when channels change); down-sampling = pad (0,1,0,1) + stride-2 3x3 conv; up-sampling =
nearest x2 + 3x3 conv; a mid block Res-Attn-Res (single-head spatial attention with 1x1 q/k/v/proj_out);
encoder ends in norm_out, swish, conv_out -> b channels, 1x1 quant_conv; the decoder starts with a 1x1
post_quant_conv. Encoder and decoder have their own channel multipliers and per-level block counts.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Configs


@dataclass
class ImageTokenizerConfig:
    """Shape of the autoencoder. `len(enc_ch_mult) - 1` stride-2 stages give the down-sampling factor."""
    # default: the CPU demo tokenizer (~0.8 M parameters; no blocks at full resolution, where convs cost most)
    ch: int = 16
    enc_ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    enc_num_res_blocks: tuple[int, ...] = (0, 1, 1, 1)
    dec_ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    dec_num_res_blocks: tuple[int, ...] = (0, 1, 1, 1)
    code_bits: int = 10
    norm_groups: int = 8
    in_channels: int = 3
    mid_attn: bool = True
    image_size: int = 64  # the resolution it was trained for (encode accepts any multiple of `downsample`)

    def __post_init__(self):
        for name in ("enc_ch_mult", "enc_num_res_blocks", "dec_ch_mult", "dec_num_res_blocks"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        if len(self.enc_ch_mult) != len(self.enc_num_res_blocks) or len(self.dec_ch_mult) != len(self.dec_num_res_blocks):
            raise ValueError("each ch_mult needs one num_res_blocks entry per level")
        if len(self.enc_ch_mult) != len(self.dec_ch_mult):
            raise ValueError("encoder and decoder need the same number of levels (same down-sampling factor)")
        if not 1 <= self.code_bits <= 20:
            raise ValueError(f"code_bits must be in 1..20, got {self.code_bits}")
        widths = {self.ch * m for m in self.enc_ch_mult + self.dec_ch_mult} | {self.ch}
        bad = [w for w in widths if w % self.norm_groups]
        if bad:
            raise ValueError(f"channel widths {sorted(bad)} are not divisible by norm_groups={self.norm_groups}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.enc_ch_mult) - 1)

    @property
    def codebook_size(self) -> int:
        return 2 ** self.code_bits

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.downsample) ** 2

    @classmethod
    def showo_magvit2(cls) -> "ImageTokenizerConfig":
        """Show-o's released MAGVIT-v2 tokenizer (256 px -> 16x16 tokens, 8192 codes, ~95.4 M parameters)."""
        return cls(ch=128, enc_ch_mult=(1, 2, 2, 4, 4), enc_num_res_blocks=(4, 3, 4, 3, 4),
                   dec_ch_mult=(1, 1, 2, 2, 4), dec_num_res_blocks=(4, 4, 3, 4, 3), code_bits=13,
                   norm_groups=32, mid_attn=True, image_size=256)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageTokenizerConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ImageTokenizerTrainConfig:
    """Optimisation settings of `train_image_tokenizer`."""
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    recon: str = "mse"            # "mse" or "l1"
    commit_weight: float = 0.05   # beta * ||z - sg(q)||^2
    entropy_weight: float = 0.01  # (per-sample entropy - codebook entropy)
    entropy_temperature: float = 1.0
    grad_clip: float = 1.0
    log_every: int = 25


TrainConfig = ImageTokenizerTrainConfig  # the former name (unif2ace.training.TrainConfig is the model's)


# --------------------------------------------------------------------------------------------------
# Building blocks (names follow Show-o's MAGVIT-v2 state dict)


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q(y), self.k(y), self.v(y)))
        y = F.scaled_dot_product_attention(q, k, v)  # [b, 1, hw, c]
        return x + self.proj_out(y.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: exact halving for even sizes


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, c: int, groups: int, attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups) if attn else nn.Identity()
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: ImageTokenizerConfig):
        super().__init__()
        g, ch = cfg.norm_groups, cfg.ch
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        in_mult = (1,) + cfg.enc_ch_mult
        self.down = nn.ModuleList()
        for lvl, (mult, n) in enumerate(zip(cfg.enc_ch_mult, cfg.enc_num_res_blocks)):
            level = nn.Module()
            cin = ch * in_mult[lvl]
            cout = ch * mult if n > 0 else cin  # a level without blocks keeps its width
            level.block = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, g) for i in range(n)])
            if lvl != len(cfg.enc_ch_mult) - 1:
                level.downsample = Downsample(cout)
            self.down.append(level)
        c = cout
        self.mid = _Mid(c, g, cfg.mid_attn)
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.code_bits, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.code_bits, cfg.code_bits, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: ImageTokenizerConfig):
        super().__init__()
        g, ch = cfg.norm_groups, cfg.ch
        c = ch * cfg.dec_ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(cfg.code_bits, cfg.code_bits, 1)
        self.conv_in = nn.Conv2d(cfg.code_bits, c, 3, padding=1)
        self.mid = _Mid(c, g, cfg.mid_attn)
        levels = [None] * len(cfg.dec_ch_mult)
        for lvl in reversed(range(len(cfg.dec_ch_mult))):  # built top-down, stored by level index
            level = nn.Module()
            n = cfg.dec_num_res_blocks[lvl]
            cout = ch * cfg.dec_ch_mult[lvl] if n > 0 else c  # a level without blocks keeps its width
            level.block = nn.ModuleList([ResnetBlock(c if i == 0 else cout, cout, g)
                                         for i in range(n)])
            c = cout
            if lvl != 0:
                level.upsample = Upsample(c)
            levels[lvl] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LFQ(nn.Module):
    """Lookup-free quantiser: no parameters; `embedding` [2^b, b] lists every code as a +-1 vector."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        power = 2 ** torch.arange(bits - 1, -1, -1)
        codes = torch.arange(2 ** bits)
        self.register_buffer("power_vals", power.float())
        self.register_buffer("embedding", ((codes[:, None] // power) % 2).float() * 2 - 1)

    def forward(self, z):
        """z [B, b, h, w] -> (straight-through +-1 latents, codes [B, h, w] int64)."""
        q = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
        codes = ((z > 0).long() * self.power_vals.long().view(1, -1, 1, 1)).sum(1)
        return z + (q - z).detach(), codes

    def codes_to_latents(self, codes):
        """codes [...] -> +-1 latents [..., b] (MSB first)."""
        power = self.power_vals.long()
        return ((codes[..., None] // power) % 2).to(self.embedding.dtype) * 2 - 1

    def entropy_terms(self, z, temperature: float = 1.0):
        """(mean per-position entropy, entropy of the batch-mean code distribution) of soft code assignments
        p(c | z) = softmax(-||z - c||^2 / T) = softmax(2 z.c / T)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.bits).float()
        logits = 2 * flat @ self.embedding.t() / temperature
        logp = logits.log_softmax(-1)
        p = logp.exp()
        per_sample = -(p * logp).sum(-1).mean()
        avg = p.mean(0)
        codebook = -(avg * avg.clamp_min(1e-12).log()).sum()
        return per_sample, codebook


# --------------------------------------------------------------------------------------------------
# The tokenizer


class ImageTokenizer(nn.Module):
    """LFQ autoencoder: `encode(images) -> codes [B, h*w]`, `decode(codes) -> images [B, 3, H, W]`."""

    def __init__(self, config: ImageTokenizerConfig | None = None):
        super().__init__()
        self.config = config or ImageTokenizerConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantize = LFQ(self.config.code_bits)

    # -- checks -------------------------------------------------------------------------------------
    def _check_images(self, images):
        cfg = self.config
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != cfg.in_channels:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"expected images of shape [B, {cfg.in_channels}, H, W], got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [-1, 1], got dtype {images.dtype} (convert uint8 with x/127.5-1)")
        h, w = images.shape[-2:]
        if h % cfg.downsample or w % cfg.downsample:
            raise ValueError(f"image size {h}x{w} is not a multiple of the down-sampling factor {cfg.downsample}")
        lo, hi = images.min().item(), images.max().item()  # a cheap guard against [0, 255] or [0, 1] mix-ups
        if lo < -1.05 or hi > 1.05:
            raise ValueError(f"expected images in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")

    # -- API ----------------------------------------------------------------------------------------
    def encode_latent(self, images):
        """Continuous pre-quantisation latents [B, b, h, w]."""
        return self.encoder(images)

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """images float [B, 3, H, W] in [-1, 1] -> codes int64 [B, (H/f)*(W/f)], row-major."""
        self._check_images(images)
        _, codes = self.quantize(self.encode_latent(images))
        return codes.flatten(1)

    @torch.no_grad()
    def decode(self, codes, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """codes int [B, h*w] (or [B, h, w]) -> images [B, 3, h*f, w*f], roughly in [-1, 1] (not clamped)."""
        if not torch.is_tensor(codes) or codes.dtype.is_floating_point or codes.dim() not in (2, 3):
            raise ValueError("expected integer codes of shape [B, h*w] or [B, h, w]")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size}), got "
                             f"[{codes.min().item()}, {codes.max().item()}]")
        if codes.dim() == 2:
            if shape is None:
                side = math.isqrt(codes.shape[1])
                if side * side != codes.shape[1]:
                    raise ValueError(f"{codes.shape[1]} codes is not a square grid; pass shape=(h, w)")
                shape = (side, side)
            codes = codes.reshape(codes.shape[0], *shape)
        z = self.quantize.codes_to_latents(codes.to(self.quantize.embedding.device)).permute(0, 3, 1, 2)
        return self.decoder(z.to(next(self.decoder.parameters()).dtype))

    def forward(self, images, train: ImageTokenizerTrainConfig | None = None):
        """Training forward: (reconstruction, dict of losses incl. "loss")."""
        t = train or ImageTokenizerTrainConfig()
        z = self.encode_latent(images)
        zq, _ = self.quantize(z)
        recon = self.decoder(zq)
        rec = F.mse_loss(recon, images) if t.recon == "mse" else F.l1_loss(recon, images)
        commit = F.mse_loss(z, torch.where(z > 0, 1.0, -1.0).detach())
        per_sample, codebook = self.quantize.entropy_terms(z, t.entropy_temperature)
        loss = rec + t.commit_weight * commit + t.entropy_weight * (per_sample - codebook)
        return recon, {"loss": loss, "recon": rec, "commit": commit, "entropy_sample": per_sample,
                       "entropy_codebook": codebook}

    # -- storage ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str) -> None:
        """Write `config.json` and `model.safetensors` into `directory`."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"_class_name": "ImageTokenizer", **self.config.to_dict()}, f, indent=1)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  os.path.join(directory, "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str = "cpu") -> "ImageTokenizer":
        """Load a tokenizer written by `save_pretrained` (or a Show-o-layout folder, see `load_magvit2`)."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"no image tokenizer folder {directory!r}")
        name = "model.safetensors" if os.path.isfile(os.path.join(directory, "model.safetensors")) else "pytorch_model.safetensors"
        if not os.path.isfile(os.path.join(directory, name)):
            raise FileNotFoundError(f"no model.safetensors (or Show-o's pytorch_model.safetensors) in {directory!r}")
        return _load(directory, name, None, map_location)


def load_magvit2(folder: str, config: ImageTokenizerConfig | None = None, map_location: str = "cpu") -> ImageTokenizer:
    """Load Show-o's MAGVIT-v2 tokenizer from `folder/config.json` + `folder/pytorch_model.safetensors`.

    Show-o's config.json holds only a class name, so the architecture defaults to
    `ImageTokenizerConfig.showo_magvit2()`; a config.json carrying our fields (ch, enc_ch_mult, ...), or an
    explicit `config`, overrides it. Raises ValueError naming every missing/unexpected tensor and the first
    shape mismatches.
    """
    return _load(folder, "pytorch_model.safetensors", config, map_location, default=ImageTokenizerConfig.showo_magvit2())


def save_magvit2(model: ImageTokenizer, folder: str) -> None:
    """Write `model` in Show-o's layout: config.json + pytorch_model.safetensors with the same key names."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "MAGVITv2", **model.config.to_dict()}, f, indent=1)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              os.path.join(folder, "pytorch_model.safetensors"))


def _load(folder, weights_name, config, map_location, default=None) -> ImageTokenizer:
    from safetensors.torch import load_file

    weights = os.path.join(folder, weights_name)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no {weights_name} in {folder!r}")
    if config is None:
        path = os.path.join(folder, "config.json")
        raw = json.load(open(path)) if os.path.isfile(path) else {}
        if "ch" in raw or default is None:
            config = ImageTokenizerConfig.from_dict(raw)
        else:
            config = default
    state = load_file(weights, device=map_location)
    with torch.device("meta"):  # shapes only: a checkpoint that does not fit fails before any allocation
        expected = {k: v for k, v in ImageTokenizer(config).state_dict().items()}
    derivable = {"quantize.embedding", "quantize.power_vals"}  # recomputed from code_bits, optional on disk
    missing = sorted(set(expected) - set(state) - derivable)
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {missing[:10]}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:10]}")
        if wrong:
            parts.append(f"shape mismatches ({len(wrong)}): {wrong[:10]}")
        raise ValueError(f"checkpoint {weights!r} does not fit the tokenizer config: " + "; ".join(parts))
    model = ImageTokenizer(config)
    model.load_state_dict({k: v for k, v in state.items() if k not in derivable}, strict=False)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Training


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (computed on [0, 1] after clamping)."""
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def _batches(data, batch_size: int, generator: torch.Generator):
    """Endless random batches [B, 3, H, W] from a tensor or a Dataset of tensors / dicts with "image"."""
    if torch.is_tensor(data):
        while True:
            idx = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
            yield data[idx]
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator,
                                         collate_fn=lambda items: torch.stack([i["image"] if isinstance(i, dict) else i for i in items]))
    while True:
        yield from loader


def train_image_tokenizer(data, config: ImageTokenizerConfig | None = None, steps: int = 1000, *,
                          train: ImageTokenizerTrainConfig | None = None, model: ImageTokenizer | None = None,
                          device: str = "cpu", seed: int = 0, progress: bool = True,
                          max_seconds: float | None = None, perceptual: nn.Module | None = None,
                          perceptual_weight: float = 0.0) -> tuple[ImageTokenizer, list[dict]]:
    """Train (or continue training `model`) on `data`: a tensor [N, 3, H, W] in [-1, 1] or a Dataset.

    `perceptual`: a frozen image encoder (images → [B, D]); with `perceptual_weight` > 0 the loss adds
    perceptual_weight · mean((E(recon) − E(x))²), so the codes keep what E reads (a face-attribute encoder: the
    one- or two-pixel attributes a pixel loss spends no bits on). Logged as "perceptual".

    AdamW with linear warm-up then cosine decay to zero at `steps` or at `max_seconds`, whichever comes
    first (the training stops there). Returns the model
    (in eval mode) and a history list of {"step", "loss", "recon", "commit", "entropy_sample",
    "entropy_codebook", "psnr"} logged every `train.log_every` steps.
    """
    import time

    from unif2ace.progress import progress_bar

    t = train or ImageTokenizerTrainConfig()
    torch.manual_seed(seed)
    model = (model or ImageTokenizer(config)).to(device).train()
    if perceptual is not None:
        perceptual = perceptual.to(device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.99))
    batches = _batches(data, t.batch_size, torch.Generator().manual_seed(seed))
    history, start = [], time.time()
    bar = progress_bar(range(steps), desc="image tokenizer", disable=not progress)
    for step in bar:
        # warm-up, then cosine decay over whichever budget (steps or seconds) runs out first
        done = step / steps if max_seconds is None else max(step / steps, (time.time() - start) / max_seconds)
        for group in opt.param_groups:
            group["lr"] = t.lr * min(1.0, (step + 1) / max(1, t.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        x = next(batches).to(device)
        recon, losses = model(x, t)
        if perceptual is not None and perceptual_weight > 0:
            with torch.no_grad():
                target = perceptual(x)
            losses["perceptual"] = F.mse_loss(perceptual(recon), target)
            losses["loss"] = losses["loss"] + perceptual_weight * losses["perceptual"]
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        if step % t.log_every == 0 or step == steps - 1:
            row = {"step": step, **{k: round(v.item(), 5) for k, v in losses.items()}, "psnr": round(psnr(recon.detach(), x), 3)}
            history.append(row)
            bar.set_postfix(loss=row["loss"], psnr=row["psnr"])
        if max_seconds is not None and time.time() - start > max_seconds:
            break
    bar.close()
    return model.eval(), history
