"""`train(cfg)`: the UniF2ace training loop (single process, DDP or FSDP under torchrun).

One optimizer step = `batch_size` sequences = micro-batches of `micro_batch_size`, spread over the ranks and
accumulated: rank r runs micro-batches r, r + W, r + 2W, … of the step. Every micro-batch mixes understanding and
generation rows (generation_fraction). The loss of a step is the mean of its micro-batch losses, so for a fixed
micro_batch_size the run computes the same thing on 1 or N processes (tests/test_train_ddp.py checks the
gradients). Micro-batch m of step s and all its randomness (masking, caption dropout, the Noise expert) come from
seeds derived from (seed, s, m): data order is a function of the step, and a resumed run repeats an
uninterrupted one exactly.

Outputs in out_dir: train_config.json, train_log.jsonl (one line per step), checkpoints/step_*/ and at the end a
pipeline directory: model/, image_tokenizer/, text_tokenizer/ (load it with unif2ace.FacePipeline).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from unif2ace.model import UniF2aceConfig, UniF2aceModel
from unif2ace.model.checkpoint import check_state
from unif2ace.training import checkpoint
from unif2ace.training.config import TrainConfig
from unif2ace.training.data import BatchOrder, TokenizedFaces, mix_seed

PARTS = ("text", "image", "token_balance", "seq_balance")


# ----------------------------------------------------------------------------------------------------------
# Set-up helpers
# ----------------------------------------------------------------------------------------------------------
def load_tokenizers(tokenizer_dir: str):
    from unif2ace.tokenizers import ImageTokenizer, TextTokenizer

    return (ImageTokenizer.from_pretrained(os.path.join(tokenizer_dir, "image_tokenizer")),
            TextTokenizer.from_pretrained(os.path.join(tokenizer_dir, "text_tokenizer")))


def model_config_for(image_tokenizer, text_tokenizer, preset: str = "tiny", **overrides) -> UniF2aceConfig:
    """A preset whose vocabulary matches the tokenizers. The model's text range is the text tokenizer's whole
    vocabulary (its BPE ids and its own specials, <|sot|>/<|eot|> among them); the model's special tokens follow,
    then the image codes."""
    ic = image_tokenizer.config
    vocab = dict(text_vocab_size=text_tokenizer.vocab_size, sot_token_id=text_tokenizer.sot_id,
                 eot_token_id=text_tokenizer.eot_id, codebook_size=ic.codebook_size,
                 num_image_tokens=ic.num_tokens, image_size=ic.image_size)
    return UniF2aceConfig.preset(preset, **{**vocab, **overrides})


def setup_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if world > 1:
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def autocast_for(precision: str, device: torch.device):
    if precision == "auto":
        use = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        use = precision == "bf16"
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up to 1, then a cosine from 1 down to min_lr_ratio at `steps`."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, biases, norms and the embedding do not. The parameters and the optimizer state stay
    fp32 (bf16 autocast only lowers the matrix products); on CUDA the update is the fused AdamW kernel."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = not cfg.fsdp and bool(decay + no_decay) and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------
# Model and optimizer state (full, unsharded) for DDP, FSDP and plain runs alike
# ----------------------------------------------------------------------------------------------------------
def full_state(model, optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    model_sd = {k: v for k, v in model_sd.items() if not k.startswith(("clip_encoder.", "face_encoder."))}
    return model_sd, optim_sd


def load_full_state(model, optimizer, model_sd: dict, optim_sd: Optional[dict]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_sd, options=opts)
    if optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, *, data: Optional[TokenizedFaces] = None, tokenizers=None, grad_hook=None) -> dict:
    """Trains a UniF2ace model as configured; returns {"step", "out_dir", "last": last log line, "seconds", "model"}.

    `data` (TokenizedFaces) and `tokenizers` ((image, text)) may be passed in to skip loading them.
    `grad_hook(step, model)` is called after the gradients of a step are complete (all-reduced across ranks) and
    before clipping and the optimizer step (tests compare DDP and single-process gradients with it)."""
    rank, world, local_rank = setup_distributed()
    device = pick_device(cfg.device, local_rank)
    master = rank == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    image_tok, text_tok = tokenizers if tokenizers is not None else load_tokenizers(cfg.tokenizer_dir)

    # --- model (the same initial weights on every rank: seeded, and DDP broadcasts rank 0's anyway) ---
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model = UniF2aceModel.from_pretrained(cfg.init_from)
    else:
        model = UniF2aceModel(model_config_for(image_tok, text_tok, cfg.model_preset, **cfg.model_overrides))
    mcfg = model.config
    model.to(device)
    # Speed / memory options of the step (they do not change what is computed).
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    if cfg.compile_blocks:
        model.compile_blocks()

    # --- data: rank 0 fills the token cache, the others wait and read it ---
    if data is None:
        from unif2ace.data import FaceDataset

        dataset = FaceDataset(cfg.data_dir, split=cfg.split, image_size=mcfg.image_size)
        cache = cfg.cache_dir or os.path.join(cfg.data_dir, ".token_cache")
        encoders = {"clip": model.clip_encoder, "face": model.face_encoder}
        for turn in (0, 1):
            if (turn == 0) == master:
                data = TokenizedFaces.build(dataset, image_tok, text_tok, encoders, caption_form=cfg.caption_form,
                                            cache_dir=cache, device=device, progress=cfg.progress and master)
            if world > 1:
                dist.barrier()
    micro_per_step = cfg.batch_size // cfg.micro_batch_size
    if micro_per_step % world:
        raise ValueError(f"batch_size / micro_batch_size = {micro_per_step} micro-batches per step must be a "
                         f"multiple of the world size {world}")
    accum = micro_per_step // world
    order = BatchOrder(data, mcfg, micro_batch_size=cfg.micro_batch_size, micro_batches_per_step=micro_per_step,
                       generation_fraction=cfg.generation_fraction, caption_fraction=cfg.caption_fraction,
                       seed=cfg.seed)

    # --- parallel wrappers ---
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        if world == 1 and not dist.is_initialized():
            raise ValueError("fsdp=True needs torchrun (a process group)")
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        wrapped = model
    elif world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None, find_unused_parameters=True)
    else:
        wrapped = model
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    # --- resume ---
    start = 0
    log_path = os.path.join(cfg.out_dir, "train_log.jsonl")
    if cfg.resume:
        found = checkpoint.load_latest(cfg.out_dir)
        if found is not None:
            path, _, model_sd, trainer = found
            check_state(model.checkpoint_state_dict() if not cfg.fsdp else model_sd, model_sd)
            load_full_state(model, optimizer, model_sd, trainer["optimizer"])
            scheduler.load_state_dict(trainer["scheduler"])
            set_rng_state(trainer["rng"])
            start = trainer["step"]
            if master:
                print(f"resumed from {path} (step {start})")
        elif master:
            print(f"no checkpoint in {cfg.out_dir}; starting from scratch")
    if master:
        cfg.save(os.path.join(cfg.out_dir, "train_config.json"))
        kept = []
        if start > 0 and os.path.exists(log_path):
            with open(log_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
        with open(log_path, "w") as f:
            f.writelines(kept)
        print(f"UniF2ace: {model.num_parameters() / 1e6:.2f}M parameters, {len(data)} images, "
              f"{len(order.vqa_rows)} VQA pairs; {world} process(es) on {device}, {accum} micro-batch(es) of "
              f"{cfg.micro_batch_size} per rank and step")

    # --- train ---
    def save_checkpoint(step: int) -> None:
        model_sd, optim_sd = full_state(model, optimizer)
        if master:
            trainer_state = {"step": step, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                             "rng": rng_state(), "data_position": {"step": step, "seed": cfg.seed},
                             "train_config": cfg.to_dict()}
            checkpoint.save(cfg.out_dir, step, mcfg.to_dict(), model_sd, trainer_state, cfg.keep_checkpoints)
        if world > 1:
            dist.barrier()

    model.train()
    t_start = time.time()
    last: dict = {}
    step = start
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not (cfg.progress and master))
    log = open(log_path, "a") if master else None
    for step in bar:
        t0 = time.time()
        sums = torch.zeros(1 + len(PARTS), dtype=torch.float64)
        for j in range(accum):
            micro = j * world + rank
            batch = to_device(order.micro_batch(step, micro), device)
            sync = j == accum - 1 or not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(mix_seed(cfg.seed, step, micro, 11))
                with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast_for(cfg.precision, device):
                    out = wrapped(batch)
                    (out.loss / accum).backward()
            sums += torch.tensor([out.loss.item()] + [float(out.parts[k]) for k in PARTS], dtype=torch.float64)
        if grad_hook is not None:
            grad_hook(step, model)
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        else:
            grad_norm = float("nan")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(sums)
        means = (sums / micro_per_step).tolist()
        last = {"step": step + 1, "loss": means[0], **dict(zip(PARTS, means[1:])), "lr": lr,
                "grad_norm": grad_norm, "step_time": time.time() - t0}
        if master:
            log.write(json.dumps(last) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{means[0]:.3f}", text=f"{means[1]:.3f}", image=f"{means[2]:.3f}", lr=f"{lr:.2e}")
        done = step + 1
        out_of_time = cfg.max_seconds > 0 and time.time() - t_start > cfg.max_seconds
        if world > 1:  # every rank stops at the same step
            flag = torch.tensor([float(out_of_time)])
            dist.all_reduce(flag)
            out_of_time = bool(flag.item() > 0)
        stop = (cfg.stop_after > 0 and done - start >= cfg.stop_after) or out_of_time
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
            save_checkpoint(done)
        if stop:
            if master and out_of_time:
                print(f"time budget of {cfg.max_seconds:.0f}s reached at step {done}")
            break
    bar.close()
    if log is not None:
        log.close()
    step = last.get("step", start)

    # --- export a pipeline directory ---
    if master:
        model_sd, _ = full_state(model, optimizer) if cfg.fsdp else (None, None)
        if cfg.fsdp:
            from unif2ace.model import checkpoint as model_checkpoint

            model_checkpoint.save(os.path.join(cfg.out_dir, "model"), mcfg.to_dict(), model_sd)
        else:
            model.save_pretrained(os.path.join(cfg.out_dir, "model"))
        export_tokenizers(cfg.out_dir, image_tok, text_tok)
    elif cfg.fsdp:
        full_state(model, optimizer)  # collective: every rank takes part in gathering the full state
    if world > 1:
        dist.barrier()
    return {"step": step, "out_dir": cfg.out_dir, "last": last, "seconds": time.time() - t_start, "model": model}


def export_tokenizers(out_dir: str, image_tok, text_tok) -> None:
    for name, tok in (("image_tokenizer", image_tok), ("text_tokenizer", text_tok)):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            shutil.rmtree(path)
        tok.save_pretrained(path)


def main_train(cfg: TrainConfig) -> dict:
    """Entry point used by the CLI: trains, then tears the process group down."""
    try:
        return train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


warnings.filterwarnings("ignore", message=".*find_unused_parameters=True was specified.*")
