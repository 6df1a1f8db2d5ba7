"""The `unif2ace` command: train, generate, ask, caption, eval and demo.

    unif2ace demo                                    # data → tokenizers → model → grid, answers, eval table
    unif2ace train --data-dir DATA --tokenizer-dir TOK --out-dir RUN --steps 2000
    torchrun --nproc_per_node=8 -m unif2ace.cli train ...   # DDP (add --fsdp to shard the model)
    unif2ace generate --model RUN --prompt "happy face, ..." --num-images 4 --out grid.png
    unif2ace ask --model RUN --image face.png --question "What colour is the background?"
    unif2ace caption --model RUN --image face.png
    unif2ace eval --model RUN --data DATA --out eval/
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from unif2ace.training.config import TrainConfig


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One --option per dataclass field (snake_case → kebab-case); dict fields take JSON."""
    for f in dataclasses.fields(cls):
        name = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, dict):
            parser.add_argument(name, type=json.loads, default=default, help="JSON object")
        elif f.name == "split":
            parser.add_argument(name, default=default, help="split to train on; 'none' for all records")
        else:
            parser.add_argument(name, type=type(default), default=default)


def _dataclass_from_args(cls, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    if "split" in values and str(values["split"]).lower() == "none":
        values["split"] = None
    return cls(**values)


def cmd_train(args) -> None:
    from unif2ace.training.trainer import main_train

    cfg = _dataclass_from_args(TrainConfig, args)
    result = main_train(cfg)
    if result["last"]:
        print(json.dumps({k: result["last"][k] for k in ("step", "loss", "text", "image")}))


def cmd_generate(args) -> None:
    from unif2ace.pipeline import FacePipeline, image_grid

    pipe = FacePipeline.from_pretrained(args.model, device=args.device)
    images = pipe.generate(args.prompt, num_images_per_prompt=args.num_images, steps=args.steps,
                           guidance_scale=args.guidance, seed=args.seed)
    captions = [p for p in args.prompt for _ in range(args.num_images)]
    image_grid(images, columns=min(len(images), args.columns), captions=captions, scale=args.scale,
               caption_lines=8).save(args.out)
    print(f"wrote {len(images)} faces to {args.out}")


def cmd_ask(args) -> None:
    from unif2ace.pipeline import FacePipeline

    pipe = FacePipeline.from_pretrained(args.model, device=args.device)
    print(pipe.answer(args.image, args.question))


def cmd_caption(args) -> None:
    from unif2ace.pipeline import FacePipeline

    pipe = FacePipeline.from_pretrained(args.model, device=args.device)
    print(pipe.caption(args.image))


def cmd_eval(args) -> None:
    from unif2ace.evaluation import evaluate, markdown_table
    from unif2ace.pipeline import FacePipeline

    pipe = FacePipeline.from_pretrained(args.model, device=args.device)
    res = evaluate(pipe, args.data, out_dir=args.out, num_generate=args.num_generate, num_vqa=args.num_vqa,
                   num_captions=args.num_captions, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                   classifier_steps=args.classifier_steps)
    print(markdown_table(res))


def cmd_demo(args) -> None:
    from unif2ace.training.demo import DemoConfig, run_demo

    cfg = DemoConfig.quick(args.out) if args.quick else DemoConfig(out=args.out)
    run_demo(cfg, docs_dir=args.docs_dir)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="unif2ace", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a UniF2ace model (torchrun for DDP / --fsdp)")
    _add_dataclass_args(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    def pipeline_args(p):
        p.add_argument("--model", required=True, help="pipeline directory (model/, image_tokenizer/, text_tokenizer/)")
        p.add_argument("--device", default="cpu")

    p = sub.add_parser("generate", help="text-to-face: a PNG grid of generated faces")
    pipeline_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a caption; repeat for several")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt")
    p.add_argument("--out", default="grid.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling of each face in the grid")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("ask", help="answer a question about a face image")
    pipeline_args(p)
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("caption", help="describe a face image")
    pipeline_args(p)
    p.add_argument("--image", required=True)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("eval", help="evaluate on the held-out split of a synthetic data set")
    pipeline_args(p)
    p.add_argument("--data", required=True, help="synthetic data directory (index.jsonl with attributes)")
    p.add_argument("--out", default="eval")
    p.add_argument("--num-generate", type=int, default=64)
    p.add_argument("--num-vqa", type=int, default=400)
    p.add_argument("--num-captions", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--classifier-steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the end-to-end CPU demo (≤ 15 minutes; --quick: ≤ 2 minutes)")
    p.add_argument("--out", default="artifacts/demo")
    p.add_argument("--quick", action="store_true", help="a small smoke version")
    p.add_argument("--docs-dir", default="", help="also copy demo_grid.png and eval_table.md here")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
