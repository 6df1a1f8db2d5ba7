"""`train(cfg)`: the UniF2ace training loop (single process, DDP or FSDP under torchrun).

One optimizer step = `batch_size` sequences = micro-batches of `micro_batch_size`, spread over the ranks and
accumulated: rank r runs micro-batches r, r + W, r + 2W, … of the step. Every micro-batch mixes understanding and
generation rows (generation_fraction). The loss of a step is the mean of its micro-batch losses, so for a fixed
micro_batch_size the run computes the same thing on 1 or N processes (tests/test_train_ddp.py checks the
gradients). Micro-batch m of step s and all its randomness (masking, caption dropout, the Noise expert) come from
seeds derived from (seed, s, m): data order is a function of the step, and a resumed run repeats an
uninterrupted one exactly.

The out dir belongs to the run: training/run_dir.py (RunDir, held by rank 0) locks it, keeps the log and the
checkpoints and exports the pipeline directory (model/, image_tokenizer/, text_tokenizer/: unif2ace.FacePipeline)
at the end, so that a kill at any moment loses no logged step up to the newest checkpoint and no complete export.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from typing import Callable, Optional

import torch
import torch.distributed as dist

from unif2ace.model import UniF2aceConfig, UniF2aceModel
from unif2ace.model.checkpoint import check_state
from unif2ace.progress import progress_bar
from unif2ace.training import checkpoint
from unif2ace.training.config import TrainConfig
from unif2ace.training.data import BatchOrder, TokenizedFaces, mix_seed
from unif2ace.model.encoders import FaceAttributeEncoder
from unif2ace.training.run_dir import RunDir

PARTS = ("text", "image", "token_balance", "seq_balance")


# ----------------------------------------------------------------------------------------------------------
# Set-up helpers
# ----------------------------------------------------------------------------------------------------------
def load_tokenizers(tokenizer_dir: str):
    from unif2ace.tokenizers import ImageTokenizer, TextTokenizer

    return (ImageTokenizer.from_pretrained(os.path.join(tokenizer_dir, "image_tokenizer")),
            TextTokenizer.from_pretrained(os.path.join(tokenizer_dir, "text_tokenizer")))


def load_face_encoder(tokenizer_dir: str) -> Optional[FaceAttributeEncoder]:
    """The trained Face encoder in `tokenizer_dir`/face_encoder (the demo trains one), else None: the model then
    uses its built-in one."""
    path = os.path.join(tokenizer_dir, "face_encoder")
    return FaceAttributeEncoder.from_pretrained(path) if os.path.isdir(path) else None


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
        # CPU tensors (the step's loss sums, broadcast objects) travel over gloo, CUDA tensors over NCCL
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
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
    with RunDir(cfg.out_dir) if rank == 0 else contextlib.nullcontext() as run:  # rank 0 owns the out dir
        found = master_only(run, world, lambda r: r.open(resume=cfg.resume, overwrite=cfg.overwrite,
                                                         tokenizer_dir=cfg.tokenizer_dir), share=lambda f: f and f[0])
        if run is None and found:
            found = (found, *checkpoint.load(found))
        image_tok, text_tok = tokenizers if tokenizers is not None else load_tokenizers(cfg.tokenizer_dir)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
        face_encoder = load_face_encoder(cfg.tokenizer_dir)
        overrides = dict(cfg.model_overrides)
        if face_encoder is not None:
            overrides["face_embed_dim"] = face_encoder.embed_dim
        model = (UniF2aceModel.from_pretrained(cfg.init_from, face_encoder=face_encoder) if cfg.init_from else
                 UniF2aceModel(model_config_for(image_tok, text_tok, cfg.model_preset, **overrides),
                               face_encoder=face_encoder))
        model.to(device)
        # Speed / memory options of the step (they do not change what is computed).
        model.set_activation_checkpointing(cfg.activation_checkpointing)
        if cfg.compile_blocks:
            model.compile_blocks()
        if data is None:
            data = tokenize_data(cfg, model, image_tok, text_tok, device, rank, world)
        micro_per_step = cfg.batch_size // cfg.micro_batch_size
        if micro_per_step % world:
            raise ValueError(f"batch_size / micro_batch_size = {micro_per_step} micro-batches per step must be a "
                             f"multiple of the world size {world}")
        order = BatchOrder(data, model.config, micro_batch_size=cfg.micro_batch_size,
                           micro_batches_per_step=micro_per_step, generation_fraction=cfg.generation_fraction,
                           caption_fraction=cfg.caption_fraction, vqa_row_tokens=cfg.vqa_row_tokens,
                           seed=cfg.seed)
        wrapped = parallelize(model, cfg, device, world, local_rank)
        optimizer = make_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        start = restore(found, model, optimizer, scheduler, cfg)
        if run is not None:
            run.save_config(cfg.to_dict())
            run.start_log(start)
            print(f"UniF2ace: {model.num_parameters() / 1e6:.2f}M parameters, {len(data)} images, "
                  f"{len(order.vqa_rows)} VQA pairs; {world} process(es) on {device}, "
                  f"{micro_per_step // world} micro-batch(es) of {cfg.micro_batch_size} per rank and step")

        model.train()
        t_start, last = time.time(), {}
        bar = progress_bar(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
                           disable=not (cfg.progress and run is not None))
        for step in bar:
            last = train_step(wrapped, model, optimizer, scheduler, order, step, cfg, device, rank, world, grad_hook)
            if run is not None:
                run.log(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", text=f"{last['text']:.3f}", image=f"{last['image']:.3f}",
                                lr=f"{last['lr']:.2e}")
            done = step + 1
            out_of_time = any_rank(cfg.max_seconds > 0 and time.time() - t_start > cfg.max_seconds, world)
            stop = (cfg.stop_after > 0 and done - start >= cfg.stop_after) or out_of_time
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
                save_checkpoint(run, done, model, optimizer, scheduler, cfg, world)
            if out_of_time and run is not None:
                print(f"time budget of {cfg.max_seconds:.0f}s reached at step {done}")
            if stop:
                break
        bar.close()

        # the exported model: gathered by every rank under FSDP (a collective), written by rank 0
        model_sd = full_state(model, optimizer)[0] if cfg.fsdp else model.checkpoint_state_dict()
        master_only(run, world, lambda r: r.export(model.config.to_dict(), model_sd, image_tok, text_tok,
                                                          face_encoder))
        return {"step": last.get("step", start), "out_dir": cfg.out_dir, "last": last,
                "seconds": time.time() - t_start, "model": model}


def train_step(wrapped, model, optimizer, scheduler, order: BatchOrder, step: int, cfg: TrainConfig,
               device: torch.device, rank: int, world: int, grad_hook=None) -> dict:
    """One optimizer step: this rank's micro-batches of `step` (r, r + W, …), accumulated. Returns the step's
    log line, its losses the mean over every micro-batch of every rank."""
    t0 = time.time()
    micro_per_step = cfg.batch_size // cfg.micro_batch_size
    accum = micro_per_step // world
    ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    sums = torch.zeros(1 + len(PARTS), dtype=torch.float64)
    for j in range(accum):
        micro = j * world + rank
        batch = to_device(order.micro_batch(step, micro), device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(mix_seed(cfg.seed, step, micro, 11))
            sync = not ddp or j == accum - 1
            with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast_for(cfg.precision, device):
                out = wrapped(batch)
                (out.loss / accum).backward()
        sums += torch.tensor([out.loss.item()] + [float(out.parts[k]) for k in PARTS], dtype=torch.float64)
    if grad_hook is not None:
        grad_hook(step, model)
    grad_norm = math.nan
    if cfg.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        dist.all_reduce(sums)
    means = (sums / micro_per_step).tolist()
    return {"step": step + 1, "loss": means[0], **dict(zip(PARTS, means[1:])), "lr": lr, "grad_norm": grad_norm,
            "step_time": time.time() - t0}


# ----------------------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------------------
def tokenize_data(cfg: TrainConfig, model, image_tok, text_tok, device, rank: int, world: int) -> TokenizedFaces:
    """The image tokens of the training split: rank 0 fills the token cache, the others wait and read it."""
    from unif2ace.data import FaceDataset

    dataset = FaceDataset(cfg.data_dir, split=cfg.split, image_size=model.config.image_size)
    cache = cfg.cache_dir or os.path.join(cfg.data_dir, ".token_cache")
    encoders = {"clip": model.clip_encoder, "face": model.face_encoder}
    data = None
    for turn in (0, 1):
        if (turn == 0) == (rank == 0):
            data = TokenizedFaces.build(dataset, image_tok, text_tok, encoders, caption_form=cfg.caption_form,
                                        cache_dir=cache, device=device, progress=cfg.progress and rank == 0)
        if world > 1:
            dist.barrier()
    return data


def parallelize(model, cfg: TrainConfig, device, world: int, local_rank: int):
    """FSDP2 (fully_shard per block, then the model, in place), DDP under torchrun, or the model as it is."""
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        if world == 1 and not dist.is_initialized():
            raise ValueError("fsdp=True needs torchrun (a process group)")
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None, find_unused_parameters=True)
    return model


def restore(found, model, optimizer, scheduler, cfg: TrainConfig) -> int:
    """Loads a checkpoint found by RunDir.open (path, config, model state, trainer state); returns its step, 0
    when there is none."""
    master = not dist.is_initialized() or dist.get_rank() == 0
    if found is None:
        if cfg.resume and master:
            print(f"no checkpoint in {cfg.out_dir}; starting from scratch")
        return 0
    path, _, model_sd, trainer = found
    if trainer["step"] > cfg.steps:
        raise ValueError(f"steps={cfg.steps} ends before the step {trainer['step']} of the checkpoint to resume "
                         f"({path}); raise --steps to continue training")
    check_state(model.checkpoint_state_dict() if not cfg.fsdp else model_sd, model_sd)
    load_full_state(model, optimizer, model_sd, trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    if master:
        print(f"resumed from {path} (step {trainer['step']})")
    return trainer["step"]


def save_checkpoint(run: Optional[RunDir], step: int, model, optimizer, scheduler, cfg: TrainConfig,
                    world: int) -> None:
    model_sd, optim_sd = full_state(model, optimizer)  # a collective under FSDP
    trainer_state = {"step": step, "optimizer": optim_sd, "scheduler": scheduler.state_dict(), "rng": rng_state(),
                     "data_position": {"step": step, "seed": cfg.seed}, "train_config": cfg.to_dict()}
    master_only(run, world, lambda r: r.save_checkpoint(step, model.config.to_dict(), model_sd, trainer_state,
                                                        cfg.keep_checkpoints))


def master_only(run: Optional[RunDir], world: int, action: Callable, share: Callable = lambda result: None):
    """Runs action(run) on rank 0 (the only rank with a RunDir) and returns its result there, share(result) on
    the other ranks. A failure on rank 0 fails every rank, so none is left waiting in a collective."""
    result, error = None, None
    if run is not None:
        try:
            result = action(run)
        except Exception as e:
            error = e
    if world > 1:
        box = [share(result) if error is None else None, None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=0)
        if run is None:
            if box[1] is not None:
                raise RuntimeError(f"rank 0 failed: {box[1]}")
            return box[0]
    if error is not None:
        raise error
    return result


def any_rank(flag: bool, world: int) -> bool:
    """Whether `flag` holds on any rank (so every rank stops at the same step)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t)
    return bool(t.item() > 0)


def main_train(cfg: TrainConfig) -> dict:
    """Entry point used by the CLI: trains, then tears the process group down."""
    try:
        return train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


warnings.filterwarnings("ignore", message=".*find_unused_parameters=True was specified.*")
