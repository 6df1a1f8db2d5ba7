"""Generation speed of UniF2ace: text decoding (tokens/s, first-token latency) and text-to-image MaskGIT sampling
(images/s), the model's paths against the plain loops they replace, in one process on one set of weights.

Text: B rows of <|mmu|> image <|sot|> prompt (prompts of different lengths, left-padded), `--new-tokens` sampled
tokens per row (<|eot|> is suppressed so every row decodes the full length):
  eager           unif2ace.model.eager_generation.generate_text_eager: a KV cache grown by concatenation every step
                  and a host check for <|eot|> after every token (the model's decoder before the static cache)
  static          model.generate_text(cuda_graphs=False): the preallocated cache, a check every 8 tokens
  static+graphs   model.generate_text(): the same step recorded once as a CUDA graph and replayed (CUDA only)
First-token latency is the time of a call with max_new_tokens=1 (prefill + one draw); the decode rate is
B·(M − 1) / (T(M) − T(1)) new tokens per second. The uncaptured variants may run fewer tokens (`--short-new-tokens`,
16 on CUDA, where each of their steps costs ~0.1 s at the paper preset): rates are per token, so they compare.

Images: `generate_images(prompts, steps, guidance)` for 1, 8 and 32 prompts (cond + uncond rows in one forward):
  eager           eager_generation.generate_images_eager: fp32 logits and the dense-mask SDPA forward per step
  fused           model.generate_images(cuda_graphs=False)
  fused+graphs    model.generate_images(): the forward recorded once as a CUDA graph (CUDA only)
"same tokens" compares each variant's output with the first variant of its table (the graphs must equal the
uncaptured path exactly; against the eager loop, on CUDA, flex_attention's rounding may differ from SDPA's).

    python -m benchmarks.bench_generate                      # CPU: the small preset
    python -m benchmarks.bench_generate --device cuda        # GPU: the paper preset in bf16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from benchmarks.harness import format_table, machine_line, sync


def timed(fn, device, repeat):
    """fn() once untimed, then the median wall time of `repeat` calls, the last result and the peak memory the
    calls added (CUDA: max allocated above what was held before; CPU: not measured, None)."""
    out = fn()
    sync(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return statistics.median(times), out, peak


def capture_note(fn):
    """Runs fn and returns (result, the reason a CUDA graph was not captured, or "")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    notes = [str(w.message) for w in caught if "not captured as a CUDA graph" in str(w.message)]
    return out, notes[0] if notes else ""


def build_model(args):
    from unif2ace.model import UniF2aceConfig, UniF2aceModel

    cfg = UniF2aceConfig.preset(args.preset)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = UniF2aceModel(cfg)
    model = model.to(getattr(torch, args.dtype)).eval()
    with torch.no_grad():
        model.lm_head.bias[cfg.eot_token_id] = -1e4  # every row decodes the full length
    return model


def bench_text(model, args, results, rows):
    from unif2ace.model.eager_generation import generate_text_eager

    cfg = model.config
    g = torch.Generator().manual_seed(1)
    B = args.rows
    prompts = [torch.randint(0, cfg.text_vocab_size - 1, (8 + (5 * b) % 9,), generator=g).tolist() for b in range(B)]
    codes = torch.randint(0, cfg.codebook_size, (B, cfg.num_image_tokens), generator=g)
    kw = dict(image_codes=codes, seed=0, top_k=50)
    cuda = args.device == "cuda"
    variants = [("eager", lambda m: generate_text_eager(model, prompts, max_new_tokens=m, **kw), args.short_new_tokens),
                ("static", lambda m: model.generate_text(prompts, max_new_tokens=m, cuda_graphs=False, **kw),
                 args.short_new_tokens)]
    if cuda:
        variants.append(("static+graphs", lambda m: model.generate_text(prompts, max_new_tokens=m, **kw),
                         args.new_tokens))
    config = f"{args.preset} {args.dtype}: {B} rows with an image, prompt {min(map(len, prompts))}-" \
             f"{max(map(len, prompts))} tokens"
    first_out, base_rate = None, None
    for name, fn, m in variants:
        t1, _, _ = timed(lambda: fn(1), args.device, args.repeat)
        (tm, out, peak), note = capture_note(lambda: timed(lambda: fn(m), args.device, args.repeat))
        rate = B * (m - 1) / max(tm - t1, 1e-9)
        first_out = first_out or out
        n = min(len(first_out[0]), len(out[0]))
        same = all(a[:n] == b[:n] for a, b in zip(first_out, out))
        base_rate = base_rate or rate
        r = dict(config=config, variant=name, new_tokens=m, time_s=tm, first_token_s=t1, tokens_per_s=rate,
                 ms_per_step=1e3 * (tm - t1) / max(m - 1, 1), peak_bytes=peak, same_tokens=same,
                 graph_note=note)
        results.append(r)
        rows.append([name, m, f"{1e3 * t1:.1f}", f"{r['ms_per_step']:.2f}", f"{rate:,.0f}", f"{rate / base_rate:.2f}x",
                     "-" if peak is None else f"{peak / 2**20:.0f}", "yes" if same else "NO",
                     note.split("(")[-1].rstrip(")")[:60] if note else ""])
    return config


def bench_images(model, args, results, rows):
    from unif2ace.model.eager_generation import generate_images_eager

    cfg = model.config
    g = torch.Generator().manual_seed(2)
    cuda = args.device == "cuda"
    configs = []
    for n in [int(x) for x in args.prompts.split(",")]:
        prompts = [torch.randint(0, cfg.text_vocab_size - 1, (6 + (7 * i) % 18,), generator=g).tolist()
                   for i in range(n)]
        kw = dict(steps=args.steps, guidance_scale=args.guidance, seed=0)
        variants = []
        if n in [int(x) for x in args.baseline_prompts.split(",") if x]:
            variants.append(("eager", lambda: generate_images_eager(model, prompts, **kw)))
            variants.append(("fused", lambda: model.generate_images(prompts, cuda_graphs=False, **kw)))
        if cuda:
            variants.append(("fused+graphs", lambda: model.generate_images(prompts, **kw)))
        elif not variants:
            variants.append(("fused", lambda: model.generate_images(prompts, cuda_graphs=False, **kw)))
        config = f"{args.preset} {args.dtype}: {n} prompts, {args.steps} steps, guidance {args.guidance}"
        configs.append(config)
        first_out, base = None, None
        for name, fn in variants:
            (t, out, peak), note = capture_note(lambda: timed(fn, args.device, args.repeat))
            first_out = out if first_out is None else first_out
            same = bool(torch.equal(first_out, out))
            base = base or t
            r = dict(config=config, variant=name, prompts=n, time_s=t, images_per_s=n / t, peak_bytes=peak,
                     same_tokens=same, graph_note=note)
            results.append(r)
            rows.append([n, name, f"{1e3 * t:.0f}", f"{n / t:.2f}", f"{base / t:.2f}x",
                         "-" if peak is None else f"{peak / 2**20:.0f}", "yes" if same else "no",
                         note.split("(")[-1].rstrip(")")[:60] if note else ""])
    return configs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, help="model preset (default: paper on CUDA, small on the CPU)")
    p.add_argument("--dtype", default=None, help="weights dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--rows", type=int, default=8, help="decoding: rows per batch")
    p.add_argument("--new-tokens", type=int, default=None, help="decoding: new tokens per row")
    p.add_argument("--short-new-tokens", type=int, default=None,
                   help="decoding: new tokens of the uncaptured variants (default: 16 on CUDA, --new-tokens else)")
    p.add_argument("--prompts", default=None, help="images: comma-separated prompt counts")
    p.add_argument("--baseline-prompts", default="8", help="images: the counts that also run the eager loop")
    p.add_argument("--steps", type=int, default=None, help="images: MaskGIT steps")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--only", default="text,images")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.preset = args.preset or ("paper" if cuda else "small")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.new_tokens = args.new_tokens or (64 if cuda else 16)
    args.short_new_tokens = args.short_new_tokens or (16 if cuda else args.new_tokens)
    args.prompts = args.prompts or ("1,8,32" if cuda else "1,8")
    args.steps = args.steps or (18 if cuda else 8)
    if not cuda:
        args.rows = min(args.rows, 4)

    model = build_model(args)
    print(f"# UniF2ace generation ({args.preset}, {model.num_parameters() / 1e9:.3f}B parameters, {args.dtype}) "
          f"on {args.device} — {machine_line()}")
    print(f"# median of {args.repeat} calls after one warm-up call\n")
    results = []
    if "text" in args.only:
        rows = []
        config = bench_text(model, args, results, rows)
        print(f"## Text decoding: {config}, sampled (top-k 50)\n")
        print(format_table(["variant", "new tokens", "first token ms", "ms per step", "new tokens/s",
                            "vs eager", "peak MiB", "same tokens", "CUDA graph"], rows))
        print()
    if "images" in args.only:
        rows = []
        bench_images(model, args, results, rows)
        print(f"## Text-to-image: {args.steps} MaskGIT steps, guidance {args.guidance}\n")
        print(format_table(["prompts", "variant", "ms", "images/s", "speed-up", "peak MiB", "same tokens",
                            "CUDA graph"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
