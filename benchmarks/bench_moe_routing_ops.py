"""Where the time of the MoE routing step goes, op by op, on the CPU.

Each routing kernel is timed twice in one process: as users call it (its outputs fresh from torch's allocator and
released again within the timed call, as in a training step) and writing into output buffers that were already
faulted in. The difference is the cost of faulting in (and unmapping) fresh pages,
which for the [T·k, H] outputs (64 MiB at the default size, mapped afresh by glibc on every call) outweighs the
kernels' own work on a VM. The eager op each kernel replaces is timed the same two ways where torch has an out=
form. A plain fill of a [T·k, H] tensor gives the machine's floor. The [T, H] outputs (16 MiB) glibc serves from
its heap, so their difference is smaller and depends on the heap's state: the op's own bookkeeping (the
dispatcher, moe_unpermute's inversion of sorted_slot) plus whatever the heap gives back and takes again.

    python -m benchmarks.bench_moe_routing_ops                     # T=8192 H=512 top-4 of 2x8, fp32
    python -m benchmarks.bench_moe_routing_ops --tokens 2048 --repeat 20

Measured on the development VM (AMD EPYC, 2 threads, torch 2.13.0+cpu), T=8192 H=512 top-4 of 16, fp32:

    | op                                     | fresh output ms | faulted-in output ms | difference ms | share |
    |----------------------------------------|-----------------|----------------------|---------------|-------|
    | fill a [T·k, H] tensor (machine floor) | 35.5            | 4.5                  | 31.0          | 87%   |
    | dispatch fwd: moe_permute              | 45.1            | 11.4                 | 33.7          | 75%   |
    |   eager: x.index_select                | 41.2            | 10.5                 | 30.8          | 75%   |
    | combine fwd: moe_unpermute             | 13.1            | 8.4                  | 4.7           | 36%   |
    | combine bwd: moe_unpermute_backward    | 49.5            | 10.7                 | 38.8          | 78%   |
    | dispatch bwd: moe_unpermute (no gates) | 8.1             | 7.9                  | 0.1           | 2%    |

The four routing kernels take 38 ms per step into faulted-in buffers and 116 ms as called (an earlier run: 37 and
104 ms); the two fresh [T·k, H] outputs account for most of the difference. The eager routing allocates about
five such tensors per step.
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.harness import format_table, machine_line, median_time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=8, help="experts per group (2 groups)")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args(argv)

    from unif2ace import _C, ops
    from unif2ace.ops.moe import _slot_positions, dl, stream_of

    n_tok, hid, k, ne = args.tokens, args.hidden, args.top_k, 2 * args.experts
    torch.manual_seed(0)
    x = torch.randn(n_tok, hid)
    logits = torch.randn(n_tok, ne)
    gid = torch.randint(0, 2, (n_tok,))
    gates, ids, _, _ = ops.moe_gate(logits, gid, num_groups=2, top_k=k)
    x_sorted, _, sorted_slot = ops.moe_dispatch(x, ids, ne)
    slot_pos = _slot_positions(sorted_slot)
    token = sorted_slot // k
    dy = torch.randn(n_tok, hid)
    unif = torch.ops.unif2ace
    s = stream_of(x)

    # Output buffers faulted in once, reused by the "faulted-in output" timings.
    rows_buf, tok_buf, gate_buf = torch.zeros_like(x_sorted), torch.zeros_like(x), torch.zeros_like(gates)

    cases = [
        ("fill a [T·k, H] tensor (machine floor)",
         lambda: torch.empty_like(x_sorted).fill_(1.0), lambda: rows_buf.fill_(1.0)),
        ("dispatch fwd: moe_permute",
         lambda: unif.moe_permute(x, sorted_slot, k),
         lambda: _C.moe_permute_rows(dl(x), dl(sorted_slot), k, dl(rows_buf), s)),
        ("  eager: x.index_select",
         lambda: x.index_select(0, token), lambda: torch.index_select(x, 0, token, out=rows_buf)),
        ("combine fwd: moe_unpermute",
         lambda: unif.moe_unpermute(x_sorted, gates, sorted_slot, k),
         lambda: _C.moe_unpermute_sum(dl(x_sorted), dl(slot_pos), dl(gates), k, dl(tok_buf), s)),
        ("combine bwd: moe_unpermute_backward",
         lambda: unif.moe_unpermute_backward(dy, x_sorted, gates, sorted_slot),
         lambda: _C.moe_unpermute_sum_backward(dl(dy), dl(x_sorted), dl(sorted_slot), dl(gates), dl(rows_buf),
                                               dl(gate_buf), s)),
        ("dispatch bwd: moe_unpermute (no gates)",
         lambda: unif.moe_unpermute(x_sorted, None, sorted_slot, k),
         lambda: _C.moe_unpermute_sum(dl(x_sorted), dl(slot_pos), None, k, dl(tok_buf), s)),
    ]
    rows = []
    for name, fresh, reused in cases:
        # A fresh output is released inside the timed call, as in a training step, so its unmapping counts too.
        t_fresh, t_reused = (median_time(f, warmup=1, repeat=args.repeat) * 1e3 for f in (fresh, reused))
        rows.append([name, f"{t_fresh:.1f}", f"{t_reused:.1f}", f"{t_fresh - t_reused:.1f}",
                     f"{(t_fresh - t_reused) / t_fresh:.0%}"])
    mib = n_tok * k * hid * x.element_size() / 2**20
    print(f"MoE routing ops, T={n_tok} H={hid} top-{k} of {ne} fp32 ([T·k, H] = {mib:.0f} MiB), median of "
          f"{args.repeat} calls — {machine_line()}")
    print(format_table(["op", "fresh output ms", "faulted-in output ms", "difference ms", "share"], rows))


if __name__ == "__main__":
    sys.exit(main())
