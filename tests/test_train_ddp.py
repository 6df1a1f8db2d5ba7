"""DDP on CPU (gloo): 2 processes under torchrun compute the gradients of a single-process run of the same global
batch (the same micro-batches, accumulated)."""
import os
import subprocess
import sys

import torch

from test_train_helpers import tiny_setup

SCRIPT = r'''
import os, sys, torch
sys.path.insert(0, sys.argv[3])
from test_train_helpers import tiny_config
from unif2ace.training import train
root, out = sys.argv[1], sys.argv[2]
grads = {}
def hook(step, model):
    if step == 1:
        grads.update({n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                      for n, p in model.named_parameters() if p.requires_grad})
train(tiny_config(root, out, steps=2, batch_size=8, micro_batch_size=4, checkpoint_every=100), grad_hook=hook)
if int(os.environ.get("RANK", "0")) == 0:
    torch.save(grads, os.path.join(out, "grads.pt"))
'''


def test_ddp_gradients_match_single_process(tmp_path):
    root = str(tmp_path)
    tiny_setup(root)
    script = tmp_path / "dump_grads.py"
    script.write_text(SCRIPT)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    subprocess.run([sys.executable, str(script), root, single, tests_dir], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                    root, ddp, tests_dir], check=True, env=env, timeout=300)
    a = torch.load(os.path.join(single, "grads.pt"))
    b = torch.load(os.path.join(ddp, "grads.pt"))
    assert a.keys() == b.keys() and len(a) > 10
    assert any(g.abs().sum() > 0 for g in a.values())
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    # both runs logged the same step-1 losses (the DDP log averages over ranks)
    import json
    la = [json.loads(x) for x in open(os.path.join(single, "train_log.jsonl"))]
    lb = [json.loads(x) for x in open(os.path.join(ddp, "train_log.jsonl"))]
    assert abs(la[0]["loss"] - lb[0]["loss"]) < 1e-5
