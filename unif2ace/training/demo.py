"""`unif2ace demo`: the whole system end to end on a CPU in about 15 minutes (`--quick`: under 2).

Stages (each caches its result under `out` keyed by the settings it depends on: a second run skips finished
stages, and a run with other settings, e.g. the full demo after `--quick` in the same folder, rebuilds the stages
whose settings differ and everything after them):

    data              render synthetic faces (train / validation / test splits by identity)
    text_tokenizer    byte-level BPE on the train split's short captions, questions and answers
    face_encoder      the Face expert's frozen encoder: an attribute classifier trained on the train split's faces
                      (the stand-in for a pretrained face-analysis network; it reads what the image tokens lose)
    image_tokenizer   LFQ autoencoder, 32 px → 8 × 8 = 64 tokens of 256 codes (pixel loss + a small term on the
                      Face encoder's features)
    train             a small UniF2ace (D3Diff loss, grouped token MoE and sequence MoE) on mixed batches
    eval              the judge (attribute classifier), generation / understanding / caption metrics per attribute,
                      the demo grid

The demo trains text-to-face on the short caption form (`unif2ace.training.data.short_caption`): a fixed-order list
of the key visible attributes. It keeps sequences short, so a ~2M-parameter model learns both directions in
minutes on two CPU cores. docs/ablations.md records what each part of the recipe is worth.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch

from unif2ace.threads import set_threads
from unif2ace.training.config import TrainConfig


@dataclass
class DemoConfig:
    out: str = "artifacts/demo"
    seed: int = 0
    threads: int = 0                   # torch CPU threads; 0 = all cores, or 1 when the machine is already busy
    # data
    num_images: int = 8000             # rendering is cheap (~50 s); 6,400 train faces make the judge reliable
    resolution: int = 32
    # tokenizers
    text_vocab_size: int = 600
    tokenizer_channels: int = 16
    tokenizer_downsample: int = 4      # 32 px → 8 × 8 = 64 tokens (8: 4 × 4 = 16 tokens lose most attributes)
    code_bits: int = 8                 # 256 image codes
    tokenizer_steps: int = 1000
    tokenizer_batch: int = 32
    tokenizer_max_seconds: float = 160.0
    tokenizer_perceptual_weight: float = 0.1  # × MSE of the Face encoder's features (0: pixel loss only)
    face_encoder_steps: int = 2000     # 0: the model's built-in random Face encoder
    face_encoder_width: int = 16
    # model and training
    model_preset: str = "tiny"
    model_overrides: dict = field(default_factory=lambda: dict(
        num_layers=3, hidden_size=128, num_heads=4, rotary_dim=16, experts_per_group=4, moe_top_k=2,
        expert_hidden_size=128, shared_hidden_size=256, max_position_embeddings=160, caption_dropout=0.1))
    steps: int = 3000                  # upper bound; the demo measures its step time and fits train_seconds
    min_steps: int = 100
    train_seconds: float = 380.0
    batch_size: int = 32
    generation_fraction: float = 0.625  # 20 of 32 rows text-to-face
    caption_fraction: float = 0.15     # share of understanding rows that are captioning (2 of 12; the rest VQA)
    vqa_row_tokens: int = 112          # VQA rows hold more questions about their image, up to a little over the
                                       # length generation and caption rows pad every row to (0: one per row)
    lr: float = 3e-3
    warmup_steps: int = 100
    train_max_seconds: float = 420.0   # hard stop (with a checkpoint) if the machine slows down mid-run
    # evaluation
    classifier_steps: int = 2500
    num_generate: int = 128
    num_vqa: int = 300
    num_captions: int = 48
    sample_steps: int = 12
    guidance_scale: float = 2.0        # guidance and temperature chosen on validation captions (docs/ablations.md)
    sample_temperature: float = 0.5
    grid_images: int = 16

    @classmethod
    def quick(cls, out: str = "artifacts/demo-quick") -> "DemoConfig":
        return cls(out=out, num_images=240, text_vocab_size=400, tokenizer_steps=40, tokenizer_max_seconds=20,
                   face_encoder_steps=40,
                   steps=30, min_steps=30, train_seconds=30, batch_size=16, warmup_steps=5, train_max_seconds=30, classifier_steps=40,
                   num_generate=8, num_vqa=32, num_captions=8, sample_steps=4, grid_images=8,
                   model_overrides=dict(num_layers=1, hidden_size=64, num_heads=2, rotary_dim=16, experts_per_group=2,
                                        moe_top_k=1, expert_hidden_size=64, shared_hidden_size=64,
                                        max_position_embeddings=128))


# Which DemoConfig fields each stage's result depends on, and which stages it reads. A stage's cache key hashes its
# settings and the keys of its inputs, so changing a setting reruns that stage and everything downstream of it.
# `out` and `threads` change where and how fast, not what: they are in no key. A field missing here is treated as
# a data setting (everything reruns); tests/test_demo.py checks that every field is placed.
STAGES = {
    "data": (("seed", "num_images", "resolution"), ()),
    "text_tokenizer": (("text_vocab_size",), ("data",)),
    "face_encoder": (("face_encoder_steps", "face_encoder_width"), ("data",)),
    "image_tokenizer": (("tokenizer_channels", "tokenizer_downsample", "code_bits", "tokenizer_steps", "tokenizer_batch",
                         "tokenizer_max_seconds", "tokenizer_perceptual_weight"), ("data", "face_encoder")),
    "train": (("model_preset", "model_overrides", "steps", "min_steps", "train_seconds", "batch_size",
               "generation_fraction", "caption_fraction", "vqa_row_tokens", "lr",
               "warmup_steps", "train_max_seconds"), ("text_tokenizer", "image_tokenizer", "face_encoder")),
    "eval": (("classifier_steps", "num_generate", "num_vqa", "num_captions", "sample_steps", "guidance_scale",
              "sample_temperature",
              "grid_images"), ("train",)),
}
RUN_SETTINGS = ("out", "threads")
# What each stage writes under `out` (removed before the stage is rebuilt with other settings).
STAGE_OUTPUTS = {
    "data": ("data", "cache"),
    "text_tokenizer": ("tokenizers/text_tokenizer",),
    "image_tokenizer": ("tokenizers/image_tokenizer",),
    "face_encoder": ("tokenizers/face_encoder",),
    "train": ("pipeline", "calibrate", "train_steps.json"),
    "eval": ("eval", "demo_grid.png"),
}


def stage_settings(cfg: DemoConfig) -> dict[str, dict]:
    """{stage: {field: value}}; a field no stage names counts as a data setting."""
    values = asdict(cfg)
    placed = {f for fields, _ in STAGES.values() for f in fields} | set(RUN_SETTINGS)
    out = {name: {f: values[f] for f in fields} for name, (fields, _) in STAGES.items()}
    out["data"].update({f: v for f, v in values.items() if f not in placed})
    return out


def stage_keys(cfg: DemoConfig) -> dict[str, str]:
    settings, keys = stage_settings(cfg), {}
    for name, (_, inputs) in STAGES.items():  # inputs come first in STAGES
        blob = json.dumps({"settings": settings[name], "inputs": [keys[i] for i in inputs]}, sort_keys=True)
        keys[name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return keys


class Stages:
    """Runs each stage once per settings: stages.json in `out` records, per stage, the key of the settings it ran
    with and whether it finished. A finished stage with the same key is skipped; one with another key (e.g. the
    data of `demo --quick` under a full `demo`) has its outputs removed and is rebuilt; an unfinished one with the
    same key is rerun in place (training resumes from its last checkpoint)."""

    def __init__(self, cfg: DemoConfig):
        self.out = cfg.out
        self.path = os.path.join(cfg.out, "stages.json")
        self.records = json.load(open(self.path)) if os.path.exists(self.path) else {}
        self.settings = stage_settings(cfg)
        self.keys = stage_keys(cfg)

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.records, f, indent=1)
        os.replace(tmp, self.path)

    def _changes(self, name: str, old: dict) -> str:
        before, now = old.get("settings", {}), self.settings[name]
        diff = [f"{k} {before.get(k)!r} → {now[k]!r}" if len(repr(before.get(k))) + len(repr(now[k])) < 40
                else f"{k} changed" for k in now if before.get(k) != now[k]]
        return "; ".join(diff[:4]) if diff else "an input stage changed"

    def run(self, name: str, fn) -> None:
        key, rec = self.keys[name], self.records.get(name)
        if rec and rec["key"] == key and rec.get("done"):
            print(f"[{name}] cached ({rec.get('seconds', 0):.1f}s when it ran)")
            return
        if rec and rec["key"] == key:
            print(f"[{name}] resuming an unfinished run ...", flush=True)
        else:
            stale = [p for p in STAGE_OUTPUTS[name] if os.path.exists(os.path.join(self.out, p))]
            if rec:
                print(f"[{name}] settings differ from the cached run ({self._changes(name, rec)}): rebuilding ...",
                      flush=True)
            elif stale:
                print(f"[{name}] outputs without a record of their settings: rebuilding ...", flush=True)
            else:
                print(f"[{name}] ...", flush=True)
            for p in stale:
                path = os.path.join(self.out, p)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        self.records[name] = {"key": key, "settings": self.settings[name], "done": False}
        self._save()
        t0 = time.time()
        fn()
        self.records[name].update(done=True, seconds=time.time() - t0)
        self._save()
        print(f"[{name}] done in {self.records[name]['seconds']:.1f}s", flush=True)

    def times(self) -> dict[str, float]:
        return {name: self.records[name].get("seconds", 0.0) for name in STAGES if name in self.records}


def run_demo(cfg: DemoConfig, docs_dir: str = "") -> dict:
    from unif2ace.data import write_synthetic_dataset
    from unif2ace.evaluation import evaluate
    from unif2ace.pipeline import FacePipeline, image_grid, save_generation_config, tensor_to_pil
    from unif2ace.training.data import question_prompt, short_caption
    from unif2ace.training.trainer import train

    torch.manual_seed(cfg.seed)
    t_all = time.time()
    print(f"unif2ace demo → {cfg.out} ({set_threads(cfg.threads)})")
    os.makedirs(cfg.out, exist_ok=True)
    # demo_config.json describes finished artifacts only: removed now, written once every stage holds these settings
    config_path = os.path.join(cfg.out, "demo_config.json")
    if os.path.exists(config_path):
        os.remove(config_path)
    data_dir = os.path.join(cfg.out, "data")
    tok_dir = os.path.join(cfg.out, "tokenizers")
    run_dir = os.path.join(cfg.out, "pipeline")
    stages = Stages(cfg)

    def records(split):
        with open(os.path.join(data_dir, "index.jsonl")) as f:
            return [r for r in map(json.loads, f) if r["split"] == split]

    stages.run("data", lambda: write_synthetic_dataset(data_dir, cfg.num_images, resolution=cfg.resolution,
                                                       seed=cfg.seed))

    def text_tokenizer():
        from unif2ace.tokenizers import TextTokenizer

        texts = []
        for r in records("train"):
            texts.append(short_caption(r["attributes"]))
            texts += [question_prompt(q["question"]) + " " + q["answer"] for q in r["vqa"]]
        TextTokenizer.train(texts, vocab_size=cfg.text_vocab_size).save_pretrained(
            os.path.join(tok_dir, "text_tokenizer"))

    stages.run("text_tokenizer", text_tokenizer)

    def face_encoder():
        from unif2ace.evaluation import load_split
        from unif2ace.model.encoders import FaceAttributeEncoder
        from unif2ace.training.attributes import label_tensor, train_attribute_classifier

        if cfg.face_encoder_steps <= 0:
            return
        images, recs = load_split(data_dir, "train", cfg.resolution)
        # seed + 1: not the judge's draw (the judge is trained separately, on train + validation, at evaluation)
        classifier = train_attribute_classifier(images, label_tensor(recs), steps=cfg.face_encoder_steps,
                                                width=cfg.face_encoder_width, seed=cfg.seed + 1, desc="face encoder")
        FaceAttributeEncoder(classifier).save_pretrained(os.path.join(tok_dir, "face_encoder"))

    stages.run("face_encoder", face_encoder)

    def image_tokenizer():
        from unif2ace.data import FaceDataset
        from unif2ace.model.encoders import FaceAttributeEncoder
        from unif2ace.tokenizers import ImageTokenizerConfig, ImageTokenizerTrainConfig, train_image_tokenizer

        ds = FaceDataset(data_dir, split="train", image_size=cfg.resolution)
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])
        mults = {4: (1, 2, 4), 8: (1, 2, 2, 4)}
        if cfg.tokenizer_downsample not in mults:
            raise ValueError(f"tokenizer_downsample must be 4 or 8, got {cfg.tokenizer_downsample!r}")
        mult = mults[cfg.tokenizer_downsample]
        icfg = ImageTokenizerConfig(ch=cfg.tokenizer_channels, enc_ch_mult=mult, enc_num_res_blocks=(1,) * len(mult),
                                    dec_ch_mult=mult, dec_num_res_blocks=(1,) * len(mult), code_bits=cfg.code_bits,
                                    norm_groups=8, mid_attn=False, image_size=cfg.resolution)
        tcfg = ImageTokenizerTrainConfig(batch_size=cfg.tokenizer_batch, lr=2e-3, warmup_steps=min(50, cfg.tokenizer_steps // 5))
        face_dir = os.path.join(tok_dir, "face_encoder")
        perceptual = FaceAttributeEncoder.from_pretrained(face_dir) if os.path.isdir(face_dir) else None
        model, hist = train_image_tokenizer(images, icfg, cfg.tokenizer_steps, train=tcfg, seed=cfg.seed,
                                            max_seconds=cfg.tokenizer_max_seconds, perceptual=perceptual,
                                            perceptual_weight=cfg.tokenizer_perceptual_weight)
        model.save_pretrained(os.path.join(tok_dir, "image_tokenizer"))
        print(f"  image tokenizer: {len(hist)} log points, last PSNR {hist[-1]['psnr']:.1f} dB")

    stages.run("image_tokenizer", image_tokenizer)

    tcfg = TrainConfig(data_dir=data_dir, tokenizer_dir=tok_dir, out_dir=run_dir, cache_dir=os.path.join(cfg.out, "cache"),
                       model_preset=cfg.model_preset, model_overrides=dict(cfg.model_overrides), steps=cfg.steps,
                       batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size,
                       generation_fraction=cfg.generation_fraction, caption_fraction=cfg.caption_fraction,
                       vqa_row_tokens=cfg.vqa_row_tokens, lr=cfg.lr,
                       warmup_steps=cfg.warmup_steps, checkpoint_every=max(50, cfg.steps // 5), resume=True,
                       max_seconds=cfg.train_max_seconds, seed=cfg.seed)

    def train_stage():
        steps_path = os.path.join(cfg.out, "train_steps.json")
        if not os.path.exists(steps_path) and cfg.min_steps >= cfg.steps:
            with open(steps_path, "w") as f:
                json.dump({"steps": cfg.steps}, f)
        if not os.path.exists(steps_path):
            # measure a few steps on this machine, then fit the step count into the time budget
            # 10 steps, the first two (warm-up) dropped: the median of 4 steps was off by 30 % at times
            probe = dataclasses.replace(tcfg, out_dir=os.path.join(cfg.out, "calibrate"), stop_after=10, resume=False,
                                        overwrite=True, progress=False, checkpoint_every=10**9)
            train(probe)
            with open(os.path.join(probe.out_dir, "train_log.jsonl")) as f:
                times = sorted([json.loads(line)["step_time"] for line in f][2:])
            per_step = times[len(times) // 2]
            steps = int(min(cfg.steps, max(cfg.min_steps, cfg.train_seconds / per_step)))
            with open(steps_path, "w") as f:
                json.dump({"steps": steps, "seconds_per_step": per_step}, f)
            print(f"  {per_step:.2f}s per step here → {steps} steps")
        with open(steps_path) as f:
            steps = json.load(f)["steps"]
        train(dataclasses.replace(tcfg, steps=steps, warmup_steps=min(cfg.warmup_steps, max(1, steps // 10)),
                                  checkpoint_every=max(25, steps // 5)))

    stages.run("train", train_stage)

    eval_dir = os.path.join(cfg.out, "eval")

    def evaluation():
        save_generation_config(run_dir, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                               temperature=cfg.sample_temperature)
        pipe = FacePipeline.from_pretrained(run_dir)
        res = evaluate(pipe, data_dir, out_dir=eval_dir, classifier_steps=cfg.classifier_steps,
                       num_generate=cfg.num_generate, num_vqa=cfg.num_vqa, num_captions=cfg.num_captions,
                       steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                       temperature=cfg.sample_temperature, seed=cfg.seed)
        gen = res["generated"]
        k = min(cfg.grid_images, len(gen["prompts"]))
        grid = image_grid(tensor_to_pil(gen["images"][:k]), columns=4, captions=gen["prompts"][:k], scale=4,
                          caption_lines=8)
        grid.save(os.path.join(cfg.out, "demo_grid.png"))

    stages.run("eval", evaluation)

    # --- report ---
    with open(os.path.join(eval_dir, "eval.json")) as f:
        res = json.load(f)
    print("\nQuestions on held-out faces (answer / ground truth):")
    for ex in res["vqa_examples"][:8]:
        print(f"  {ex['image']}: {ex['question']}  ->  {ex['answer']!r}  (truth: {ex['truth']!r})")
    print("\nCaptions of held-out faces:")
    for ex in res["caption_examples"][:3]:
        print(f"  model: {ex['caption']}\n  truth: {ex['truth']}")
    with open(os.path.join(eval_dir, "eval_table.md")) as f:
        table = f.read()
    print("\n" + table)
    times = stages.times()
    with open(config_path, "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    print("Stage wall times: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
          + f"; total {sum(times.values()):.1f}s (this invocation {time.time() - t_all:.1f}s)")
    print(f"Grid of generated faces: {os.path.join(cfg.out, 'demo_grid.png')}")
    if docs_dir:
        os.makedirs(docs_dir, exist_ok=True)
        shutil.copy(os.path.join(cfg.out, "demo_grid.png"), os.path.join(docs_dir, "demo_grid.png"))
        shutil.copy(os.path.join(eval_dir, "eval_table.md"), os.path.join(docs_dir, "eval_table.md"))
    return {"eval": res, "times": times}
