"""The `unif2ace` command: demo, train, generate, ask, caption, eval and convert.

    unif2ace demo                                    # data → tokenizers → model → grid, answers, eval table
    unif2ace train --data-dir DATA --tokenizer-dir TOK --out-dir RUN --steps 2000
    torchrun --nproc_per_node=8 -m unif2ace.cli train ...   # DDP (add --fsdp to shard the model)
    unif2ace generate --model RUN --prompt "happy face, ..." --out faces/grid.png   # + faces/grid_0.png, ...
    unif2ace ask --model RUN --image faces/grid_0.png --question "What colour is the background?"
    unif2ace caption --model RUN --image faces/grid_0.png
    unif2ace eval --model RUN --data-dir DATA --out-dir eval/
    unif2ace convert SHOWO_DIR OUT_DIR               # a Show-o checkpoint → a UniF2ace model directory

Every command takes --threads, --no-progress and --debug. A mistake in the arguments or the inputs is reported as
one line on stderr with a non-zero exit status; --debug shows the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from unif2ace.training.config import TrainConfig

PRESETS = ("tiny", "small", "medium", "paper")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, without a traceback."""


# Errors that describe the user's input: reported by their message alone. Anything else is reported with its type
# and a pointer to --debug (it is a bug, or something unexpected in the environment).
USER_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


# ----------------------------------------------------------------------------------------------------------
# Argument parsing helpers
# ----------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help (when it has a meaningful one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("(default" in text or default in (None, argparse.SUPPRESS, "") or not action.option_strings
                or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction))):
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{text} (default: {'on' if default else 'off'})".strip()
        shown = json.dumps(default) if isinstance(default, dict) else "%(default)s"
        return f"{text} (default: {shown})".strip()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and value != float("inf")):  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"num_layers\": 8}}', got {text!r}")
    return value


def _alias(parser, flag: str, dest: str, **kwargs) -> None:
    """An old spelling of an option, accepted but not shown in --help."""
    parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def _common_args(parser, *, progress_flag: bool = True) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--threads", type=non_negative_int, default=0,
                       help="torch CPU threads; 0 = all cores, or 1 when the machine is already busy "
                            "(oversubscribed cores make steps many times slower)")
    if progress_flag:
        group.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                           help="no progress bars or progress lines (without a terminal they are a few lines anyway)")
    group.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def _device_arg(parser) -> None:
    parser.add_argument("--device", default="auto",
                        help="'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'")


# ----------------------------------------------------------------------------------------------------------
# Checks of inputs (each raises UserError with one line naming the argument)
# ----------------------------------------------------------------------------------------------------------
def check_device(name: str) -> str:
    """'auto' → 'cuda' or 'cpu'; a CUDA device that this machine or this torch build cannot provide is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise UserError(f"--device {name}: this torch build has no CUDA support (torch {torch.__version__}); "
                            "use --device cpu")
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is visible on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UserError(f"--device {name!r}: only cpu and cuda devices are supported")
    return name


def check_dir(flag: str, path: str, what: str) -> None:
    if not path:
        raise UserError(f"{flag} is required: {what}")
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory; expected {what}")


def check_pipeline_dir(path: str) -> None:
    check_dir("--model", path, "a pipeline directory written by `unif2ace train` or `unif2ace demo`")
    missing = [sub for sub in ("model", "image_tokenizer", "text_tokenizer")
               if not os.path.isdir(os.path.join(path, sub))]
    if missing:
        raise UserError(f"--model {path}: not a pipeline directory (missing {', '.join(m + '/' for m in missing)}; "
                        "`unif2ace train` and `unif2ace demo` write one)")


def check_tokenizer_dir(path: str) -> None:
    what = "a folder holding image_tokenizer/ and text_tokenizer/ (see docs/data.md)"
    check_dir("--tokenizer-dir", path, what)
    image = os.path.join(path, "image_tokenizer")
    if not any(os.path.isfile(os.path.join(image, f)) for f in ("model.safetensors", "pytorch_model.safetensors")):
        raise UserError(f"--tokenizer-dir {path}: no image tokenizer (expected {image}/model.safetensors and "
                        "config.json, as ImageTokenizer.save_pretrained writes)")
    text = os.path.join(path, "text_tokenizer", "tokenizer.json")
    if not os.path.isfile(text):
        raise UserError(f"--tokenizer-dir {path}: no text tokenizer (expected {text}, as "
                        "TextTokenizer.save_pretrained writes)")


def check_image_file(flag: str, path: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")


def check_output_file(flag: str, path: str) -> None:
    """Before any work: the folder exists and the suffix names an image format."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder!r} does not exist (create it first)")
    if os.path.splitext(path)[1].lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{flag} {path}: the name must end in an image suffix ({', '.join(IMAGE_SUFFIXES)})")


def _status(message: str) -> None:
    """A status line for the user: on stderr, so stdout carries only results (answers, captions, tables)."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------
TRAIN_HELP = {
    "data_dir": "synthetic data folder (index.jsonl, from `python -m unif2ace.data.synthetic`) or a "
                "UniF²aceD-1M-style folder",
    "tokenizer_dir": "folder with image_tokenizer/, text_tokenizer/ and optionally face_encoder/ (docs/data.md)",
    "out_dir": "run folder: train_config.json, train_log.jsonl, checkpoints/, and at the end a pipeline "
               "(model/, image_tokenizer/, text_tokenizer/, and face_encoder/ when TOK has one)",
    "cache_dir": "image-token cache ('' = DATA/.token_cache)",
    "split": "split to train on; 'none' for all records (real data without a split field)",
    "caption_form": "'short': the attribute list of synthetic data; 'full': the data set's own captions",
    "num_workers": "data-loading worker processes for the token cache",
    "model_preset": "model size (docs/model.md has the table)",
    "model_overrides": "UniF2aceConfig fields on top of the preset, as JSON",
    "init_from": "a model directory (save_pretrained) to start from instead of random weights",
    "batch_size": "sequences per optimizer step, over all processes",
    "micro_batch_size": "sequences per forward pass; steps accumulate batch_size / (micro_batch_size · processes)",
    "generation_fraction": "share of text-to-face rows in every micro-batch (the rest is understanding)",
    "caption_fraction": "share of understanding rows that are captioning (the rest is VQA)",
    "vqa_row_tokens": "pack further questions about the same image into a VQA row while it fits this many tokens "
                      "(0: one question per row)",
    "steps": "optimizer steps (sets the learning-rate schedule)",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "the cosine decays to lr · min_lr_ratio",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW β1",
    "beta2": "AdamW β2",
    "grad_clip": "gradient-norm clipping; 0 disables it",
    "precision": "'auto': bf16 autocast on CUDA with bf16, fp32 elsewhere",
    "activation_checkpointing": "recompute each block's activations in the backward (less memory, one more forward)",
    "compile_blocks": "torch.compile the transformer blocks (faster steps after about a minute of compilation)",
    "seed": "seed of the weights, the data order and all masking",
    "checkpoint_every": "steps between checkpoints",
    "keep_checkpoints": "newest checkpoints kept",
    "resume": "continue from the newest good checkpoint in --out-dir",
    "overwrite": "delete the run already in --out-dir and start again (without it, a fresh run there is refused)",
    "stop_after": "stop after this many steps of this invocation (0: never); the schedule still follows --steps",
    "max_seconds": "stop with a checkpoint after this wall time (0: no limit)",
    "progress": "progress bar / progress lines",
    "device": "'auto' (cuda when available), 'cpu' or 'cuda'",
    "fsdp": "shard parameters, gradients and optimizer state over the processes (FSDP2; under torchrun)",
}
TRAIN_CHOICES = {"model_preset": PRESETS, "caption_form": ("short", "full"), "precision": ("auto", "bf16", "fp32"),
                 "device": ("auto", "cpu", "cuda")}


def add_dataclass_args(parser: argparse.ArgumentParser, cls, helps: dict, choices: dict) -> None:
    """One --option per dataclass field (snake_case → kebab-case); dict fields take JSON."""
    group = parser.add_argument_group("training settings (TrainConfig fields)")
    for f in dataclasses.fields(cls):
        name = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = helps.get(f.name, "")
        if isinstance(default, bool):
            group.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif isinstance(default, dict):
            group.add_argument(name, type=json_object, default=default, help=text)
        elif f.name == "split":
            group.add_argument(name, default=default, help=text)
        else:
            group.add_argument(name, type=type(default), default=default, choices=choices.get(f.name), help=text)


def dataclass_from_args(cls, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    if "split" in values and str(values["split"]).lower() == "none":
        values["split"] = None
    return cls(**values)


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a UniF2ace model (torchrun for DDP, --fsdp to shard)",
                       description="Train a UniF2ace model. Every TrainConfig field is a flag; see docs/training.md.",
                       formatter_class=_HelpFormatter)
    add_dataclass_args(p, TrainConfig, TRAIN_HELP, TRAIN_CHOICES)
    _common_args(p, progress_flag=False)  # --progress/--no-progress is the TrainConfig field
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    from unif2ace.training.trainer import main_train

    check_dir("--data-dir", args.data_dir, "a data folder (`python -m unif2ace.data.synthetic DATA` writes one)")
    check_tokenizer_dir(args.tokenizer_dir)
    if args.init_from and not os.path.isfile(os.path.join(args.init_from, "config.json")):
        raise UserError(f"--init-from {args.init_from}: not a model directory (no config.json)")
    if args.device != "auto":
        check_device(args.device)
    cfg = dataclass_from_args(TrainConfig, args)
    if os.environ.get("RANK", "0") == "0":
        _status(f"unif2ace train: {args.thread_info}")
    result = main_train(cfg)
    if result["last"]:
        print(json.dumps({k: result["last"][k] for k in ("step", "loss", "text", "image")}))


# ----------------------------------------------------------------------------------------------------------
# generate, ask, caption
# ----------------------------------------------------------------------------------------------------------
def _pipeline_args(p) -> None:
    p.add_argument("--model", required=True,
                   help="pipeline directory (model/, image_tokenizer/, text_tokenizer/), e.g. artifacts/demo/pipeline")
    _device_arg(p)


def _sampling_args(p) -> None:
    p.add_argument("--num-inference-steps", type=positive_int, default=None,
                   help="MaskGIT steps (default: the pipeline's generation_config.json, else 12)")
    p.add_argument("--guidance-scale", type=non_negative_float, default=None,
                   help="classifier-free guidance; 0 = none (default: the pipeline's generation_config.json, else 3)")
    p.add_argument("--temperature", type=positive_float, default=None,
                   help="temperature of the code sampling (default: the pipeline's generation_config.json, else 1)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="Philox seed of the sampler: the same draws on any device and thread count")
    _alias(p, "--steps", "num_inference_steps", type=positive_int)
    _alias(p, "--guidance", "guidance_scale", type=non_negative_float)


def _load_pipeline(args):
    from unif2ace.pipeline import FacePipeline

    device = check_device(args.device)
    check_pipeline_dir(args.model)
    pipe = FacePipeline.from_pretrained(args.model, device=device)
    pipe.set_progress_bar_config(disable=not args.progress)
    return pipe


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="text-to-face: a grid of generated faces plus each face on its own",
                       description="Generate faces from captions. Writes the captioned grid to --out and every face "
                                   "beside it (grid.png → grid_0.png, grid_1.png, ...).",
                       formatter_class=_HelpFormatter)
    _pipeline_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a caption; repeat the flag for several")
    p.add_argument("--negative-prompt", default=None,
                   help="caption to guide away from (replaces the empty caption of classifier-free guidance)")
    p.add_argument("--num-images-per-prompt", type=positive_int, default=4, help="faces per prompt")
    p.add_argument("--out", default="grid.png", help="the grid image; the faces go beside it as <name>_<i><suffix>")
    _sampling_args(p)
    p.add_argument("--columns", type=positive_int, default=4, help="faces per row of the grid")
    p.add_argument("--scale", type=positive_int, default=4, help="pixel upscaling of each face in the grid")
    _alias(p, "--num-images", "num_images_per_prompt", type=positive_int)
    _common_args(p)
    p.set_defaults(func=cmd_generate)


def face_paths(grid_path: str, count: int) -> list[str]:
    stem, suffix = os.path.splitext(grid_path)
    return [f"{stem}_{i}{suffix}" for i in range(count)]


def cmd_generate(args) -> None:
    from unif2ace.pipeline import image_grid

    check_output_file("--out", args.out)
    pipe = _load_pipeline(args)
    n = len(args.prompt) * args.num_images_per_prompt
    steps = args.num_inference_steps or pipe.generation_config["num_inference_steps"]
    guidance = pipe.generation_config["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
    temperature = pipe.generation_config["temperature"] if args.temperature is None else args.temperature
    _status(f"generating {n} face(s) from {len(args.prompt)} prompt(s): {steps} steps, guidance {guidance}, "
            f"temperature {temperature}, seed {args.seed}, on {pipe.device} with {args.thread_info}")
    images = pipe(args.prompt, negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images_per_prompt,
                  num_inference_steps=steps, guidance_scale=guidance, temperature=temperature, seed=args.seed).images
    captions = [p for p in args.prompt for _ in range(args.num_images_per_prompt)]
    image_grid(images, columns=min(len(images), args.columns), captions=captions, scale=args.scale,
               caption_lines=8).save(args.out)
    paths = face_paths(args.out, len(images))
    for image, path in zip(images, paths):
        image.save(path)
    shown = paths[0] if len(paths) == 1 else f"{paths[0]} … {os.path.basename(paths[-1])}"
    print(f"wrote {len(images)} faces to {args.out} (grid) and {shown}")


def add_ask_parser(sub) -> None:
    p = sub.add_parser("ask", help="answer a question about a face image",
                       description="Answer a question about a face (greedy decoding). The question is wrapped in "
                                   "the model's prompt form 'USER: <question> ASSISTANT:'.",
                       formatter_class=_HelpFormatter)
    _pipeline_args(p)
    p.add_argument("--image", required=True, help="a face image (any size; resized and centre-cropped)")
    p.add_argument("--question", required=True, help='e.g. "What colour is the background?"')
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="longest answer in tokens")
    _common_args(p)
    p.set_defaults(func=cmd_ask)


def cmd_ask(args) -> None:
    check_image_file("--image", args.image)
    pipe = _load_pipeline(args)
    print(pipe.answer(args.image, args.question, max_new_tokens=args.max_new_tokens))


def add_caption_parser(sub) -> None:
    p = sub.add_parser("caption", help="describe a face image",
                       description="Describe a face (the question 'Describe the face.', greedy decoding).",
                       formatter_class=_HelpFormatter)
    _pipeline_args(p)
    p.add_argument("--image", required=True, help="a face image (any size; resized and centre-cropped)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="longest caption in tokens")
    _common_args(p)
    p.set_defaults(func=cmd_caption)


def cmd_caption(args) -> None:
    check_image_file("--image", args.image)
    pipe = _load_pipeline(args)
    print(pipe.caption(args.image, max_new_tokens=args.max_new_tokens))


# ----------------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------------
def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate on the held-out split of a synthetic data set",
                       description="Generation attribute accuracy, Fréchet distance, VQA exact match and caption "
                                   "recall on the test split, each beside a reference or baseline (docs/training.md).",
                       formatter_class=_HelpFormatter)
    _pipeline_args(p)
    p.add_argument("--data-dir", help="synthetic data folder (index.jsonl with attributes); required")
    p.add_argument("--out-dir", default="eval", help="eval.json, eval_table.md and the attribute classifier")
    p.add_argument("--num-generate", type=positive_int, default=64, help="faces generated from held-out captions")
    p.add_argument("--num-vqa", type=positive_int, default=400, help="held-out question-answer pairs")
    p.add_argument("--num-captions", type=positive_int, default=64, help="held-out faces captioned")
    p.add_argument("--classifier-steps", type=positive_int, default=2500,
                   help="training steps of the attribute classifier that judges generated faces (a classifier "
                        "cached in --out-dir is reused only if trained with the same settings, code and data)")
    _sampling_args(p)
    _alias(p, "--data", "data_dir")
    _alias(p, "--out", "out_dir")
    _common_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> None:
    from unif2ace.evaluation import evaluate, markdown_table

    check_dir("--data-dir", args.data_dir, "a synthetic data folder")
    if not os.path.isfile(os.path.join(args.data_dir, "index.jsonl")):
        raise UserError(f"--data-dir {args.data_dir}: no index.jsonl (eval needs a synthetic data folder with "
                        "attribute labels, from `python -m unif2ace.data.synthetic`)")
    pipe = _load_pipeline(args)
    cfg = pipe.generation_config
    steps = args.num_inference_steps or cfg["num_inference_steps"]
    guidance = cfg["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
    temperature = cfg["temperature"] if args.temperature is None else args.temperature
    _status(f"evaluating {args.model} on {args.data_dir} ({steps} steps, guidance {guidance}, temperature "
            f"{temperature}) on {pipe.device} with {args.thread_info}")
    res = evaluate(pipe, args.data_dir, out_dir=args.out_dir, num_generate=args.num_generate, num_vqa=args.num_vqa,
                   num_captions=args.num_captions, steps=steps, guidance_scale=guidance, temperature=temperature,
                   seed=args.seed,
                   classifier_steps=args.classifier_steps, progress=args.progress)
    print(markdown_table(res))


# ----------------------------------------------------------------------------------------------------------
# demo, convert
# ----------------------------------------------------------------------------------------------------------
def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the end-to-end CPU demo (about 15 minutes; --quick: about 2)",
                       description="Synthetic faces → tokenizers → a small UniF2ace → generated grid, answers and the "
                                   "evaluation table. Finished stages are cached in --out-dir and rerun when their "
                                   "settings change.",
                       formatter_class=_HelpFormatter)
    p.add_argument("--out-dir", default=None,
                   help="artifacts folder (default: artifacts/demo, or artifacts/demo-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a small smoke version (~2 minutes)")
    p.add_argument("--docs-dir", default="", help="also copy demo_grid.png and eval_table.md here")
    _alias(p, "--out", "out_dir")
    _common_args(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> None:
    from unif2ace.training.demo import DemoConfig, run_demo

    if args.quick:
        cfg = DemoConfig.quick(args.out_dir) if args.out_dir else DemoConfig.quick()
    else:
        cfg = DemoConfig(out=args.out_dir) if args.out_dir else DemoConfig()
    run_demo(dataclasses.replace(cfg, threads=args.threads), docs_dir=args.docs_dir)


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a Show-o checkpoint into a UniF2ace model directory",
                       description="Convert a Show-o checkpoint folder (config.json + pytorch_model.safetensors, "
                                   "e.g. huggingface.co/showlab/show-o) into a UniF2ace model directory "
                                   "(docs/model.md, 'Show-o import').",
                       formatter_class=_HelpFormatter)
    p.add_argument("showo_dir", help="the Show-o folder")
    p.add_argument("out_dir", help="the UniF2ace model directory to write")
    p.add_argument("--config", help="a UniF2ace config.json to convert into (default: derived from Show-o)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    _common_args(p, progress_flag=False)
    p.set_defaults(func=cmd_convert, progress=True)


def cmd_convert(args) -> None:
    from unif2ace.model.config import UniF2aceConfig
    from unif2ace.model.convert import WEIGHT_FILES, from_showo

    check_dir("showo_dir", args.showo_dir, "a Show-o checkpoint folder")
    if not os.path.isfile(os.path.join(args.showo_dir, "config.json")) or not any(
            os.path.isfile(os.path.join(args.showo_dir, w)) for w in WEIGHT_FILES):
        raise UserError(f"{args.showo_dir}: not a Show-o checkpoint folder (it needs config.json and "
                        f"{' or '.join(WEIGHT_FILES)}, e.g. from huggingface.co/showlab/show-o)")
    if args.config and not os.path.isfile(args.config):
        raise UserError(f"--config {args.config}: no such file")
    config = UniF2aceConfig.load(args.config) if args.config else None
    model = from_showo(args.showo_dir, args.out_dir, config=config, max_shard_size=args.max_shard_size)
    print(f"wrote {args.out_dir}: {model.num_parameters():,} parameters")


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="unif2ace", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for add in (add_demo_parser, add_train_parser, add_generate_parser, add_ask_parser, add_caption_parser,
                add_eval_parser, add_convert_parser):
        add(sub)
    return ap


def error_line(command: str, exc: BaseException) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, USER_ERRORS):
        return f"unif2ace {command}: error: {message}"
    from unif2ace.model.checkpoint import CheckpointError
    from unif2ace.training.run_dir import RunDirError

    if isinstance(exc, (CheckpointError, RunDirError)):
        return f"unif2ace {command}: error: {message}"
    return f"unif2ace {command}: error: {type(exc).__name__}: {message} (rerun with --debug for the traceback)"


def main(argv=None) -> int:
    import torch

    from unif2ace.progress import progress_enabled, set_progress
    from unif2ace.threads import set_threads

    args = build_parser().parse_args(argv)
    progress_before, threads_before = progress_enabled(), torch.get_num_threads()
    try:
        set_progress(args.progress)
        if args.command != "demo":  # the demo chooses and reports its threads itself
            args.thread_info = set_threads(args.threads)
        args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"unif2ace {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(error_line(args.command, exc), file=sys.stderr)
        return 1
    finally:
        set_progress(progress_before)
        torch.set_num_threads(threads_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
