"""Data-generation speed, image-tokenizer training time and held-out reconstruction PSNR (CPU).

    python benchmarks/bench_tokenizer.py [--seconds 210] [--train-images 2048] [--out docs/tokenizer_reconstructions.png]

Prints the numbers and writes a PNG grid: originals on the top row, reconstructions below.
"""
import argparse
import os
import tempfile
import time

import torch
from PIL import Image

from unif2ace.data.synthetic import synthetic_images, write_synthetic_dataset
from unif2ace.tokenizers import ImageTokenizer, ImageTokenizerConfig, ImageTokenizerTrainConfig, psnr, train_image_tokenizer


def to_pil(x: torch.Tensor) -> Image.Image:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=210.0, help="training time budget")
    ap.add_argument("--train-images", type=int, default=2048)
    ap.add_argument("--held-out", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small convs)")
    ap.add_argument("--out", default="docs/tokenizer_reconstructions.png")
    ap.add_argument("--save", default=None, help="directory to save the trained tokenizer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:  # data-set writing speed: render + caption + PNG + index
        t = time.time()
        write_synthetic_dataset(tmp, 200, resolution=64, progress=False)
        write_rate = 200 / (time.time() - t)
    t = time.time()
    train = synthetic_images(args.train_images, 64, seed=0)
    render_rate = args.train_images / (time.time() - t)
    held = synthetic_images(args.held_out, 64, seed=12345)  # other seed: unseen identities and renders

    cfg = ImageTokenizerConfig()
    t = time.time()
    model, hist = train_image_tokenizer(train, cfg, steps=100_000, train=ImageTokenizerTrainConfig(batch_size=args.batch_size, log_every=50),
                                        max_seconds=args.seconds, progress=True)
    train_time = time.time() - t
    steps = hist[-1]["step"] + 1
    with torch.no_grad():
        recon = torch.cat([model.decode(model.encode(held[i:i + 32])) for i in range(0, len(held), 32)])
    const = held.mean((0, 2, 3), keepdim=True).expand_as(held)
    codes = model.encode(held)

    print(f"machine: {os.cpu_count()} CPU cores, torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
    print(f"data generation (64x64): {write_rate:.1f} images/s written to disk (PNG + captions + VQA), "
          f"{render_rate:.1f} images/s rendered in memory")
    print(f"tokenizer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {cfg.num_tokens} tokens of "
          f"{cfg.code_bits} bits ({cfg.codebook_size} codes) per 64x64 image")
    print(f"training: {steps} steps of batch {args.batch_size} in {train_time:.0f} s ({train_time / steps:.2f} s/step)")
    print(f"held-out PSNR: {psnr(recon, held):.2f} dB (per-channel-mean predictor: {psnr(const, held):.2f} dB); "
          f"{codes.unique().numel()} distinct codes used on {args.held_out} held-out images")

    n = 8
    grid = Image.new("RGB", (64 * n, 128), (255, 255, 255))
    for i in range(n):
        grid.paste(to_pil(held[i]), (64 * i, 0))
        grid.paste(to_pil(recon[i]), (64 * i, 64))
    grid = grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out}")
    if args.save:
        model.save_pretrained(args.save)


if __name__ == "__main__":
    main()
