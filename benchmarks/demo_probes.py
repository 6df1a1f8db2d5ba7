"""Probes of a finished demo folder that docs/ablations.md quotes (not speed benchmarks):

    python -m benchmarks.demo_probes sampling --demo-dir artifacts/demo [--num 400]
        generation accuracy of the demo's model per MaskGIT setting (guidance × temperature), judged by the demo's
        judge on *validation* captions (the test split stays for the evaluation).
    python -m benchmarks.demo_probes tokenizer --demo-dir artifacts/demo
        what survives tokenization: PSNR and the judge's accuracy on reconstructions of the held-out faces, beside
        its accuracy on the raw faces, per caption attribute. This is the ceiling for generation.

Both read artifacts/demo/{data, pipeline, eval/attribute_classifier.pt} as `unif2ace demo` leaves them.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time

import torch

from unif2ace.evaluation import attribute_agreement, classify, load_classifier, load_split, per_attribute_accuracy
from unif2ace.training.attributes import label_tensor
from unif2ace.training.data import caption_attributes, short_caption


def _load(demo_dir: str):
    from unif2ace.pipeline import FacePipeline

    judge_path = os.path.join(demo_dir, "eval", "attribute_classifier.pt")
    if not os.path.isfile(judge_path):
        raise SystemExit(f"{judge_path}: missing (run `unif2ace demo --out-dir {demo_dir}` first)")
    pipe = FacePipeline.from_pretrained(os.path.join(demo_dir, "pipeline"))
    return pipe, load_classifier(judge_path)


def sampling(args) -> None:
    pipe, judge = _load(args.demo_dir)
    _, records = load_split(os.path.join(args.demo_dir, "data"), "validation", pipe.model.config.image_size)
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    chosen = [records[i] for i in order[:args.num]]
    ids = [pipe.text_tokenizer.encode(short_caption(r["attributes"])) for r in chosen]
    print(f"{len(chosen)} validation captions, {args.steps} MaskGIT steps; generation attribute accuracy:")
    print("| Guidance | " + " | ".join(f"temperature {t}" for t in args.temperatures) + " |")
    print("|---|" + "---|" * len(args.temperatures))
    for g in args.guidance:
        cells = []
        for t in args.temperatures:
            t0 = time.time()
            codes = torch.cat([pipe.model.generate_images(ids[i:i + 64], steps=args.steps, guidance_scale=g,
                                                          temperature=t, seed=i) for i in range(0, len(ids), 64)])
            _, pred = classify(judge, pipe.decode_codes(codes))
            acc = attribute_agreement(pred, chosen)[0]
            cells.append(f"{acc:.3f} ({time.time() - t0:.0f} s)")
        print(f"| {g} | " + " | ".join(cells) + " |", flush=True)


def tokenizer(args) -> None:
    pipe, judge = _load(args.demo_dir)
    images, records = load_split(os.path.join(args.demo_dir, "data"), "test", pipe.model.config.image_size)
    with torch.no_grad():
        recon = torch.cat([pipe.decode_codes(pipe.image_tokenizer.encode(images[i:i + 200]))
                           for i in range(0, len(images), 200)])
    mse = torch.mean((recon - images) ** 2).item()
    labels = label_tensor(records)
    stated = sorted({a for r in records for a in caption_attributes(r["attributes"])})
    rows = {}
    for name, x in (("raw faces", images), ("reconstructions", recon)):
        acc = per_attribute_accuracy(classify(judge, x)[1], labels)
        rows[name] = acc
        print(f"judge on {name}: {sum(acc[a][0] for a in stated) / len(stated):.3f} over the caption attributes")
    print(f"PSNR of the reconstructions: {10 * math.log10(4 / mse):.1f} dB ({len(images)} held-out faces)")
    print("| Attribute | Raw | Reconstructed |\n|---|---|---|")
    for a in stated:
        print(f"| {a} | {rows['raw faces'][a][0]:.2f} | {rows['reconstructions'][a][0]:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="probe", required=True)
    s = sub.add_parser("sampling", help="generation accuracy per guidance and temperature (validation captions)")
    s.add_argument("--demo-dir", default="artifacts/demo")
    s.add_argument("--num", type=int, default=400, help="validation captions")
    s.add_argument("--steps", type=int, default=12)
    s.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    s.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.5, 0.2])
    s.set_defaults(func=sampling)
    t = sub.add_parser("tokenizer", help="the judge on the image tokenizer's reconstructions of held-out faces")
    t.add_argument("--demo-dir", default="artifacts/demo")
    t.set_defaults(func=tokenizer)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
