"""A failed host allocation inside an op raises MemoryError; it never aborts the interpreter.

Each case runs in a child process whose address space is capped (RLIMIT_AS) just above what it already uses,
after its inputs exist, so the op's own scratch allocation is what fails. The child reports what each call
raised, then lifts the cap and runs an op again to show the interpreter is intact. A fixed malloc mmap
threshold makes every large buffer a fresh mapping (glibc would otherwise keep freed ones in its heap and reuse
them under the cap).
"""
import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource, sys
import torch
from unif2ace import ops

torch.set_num_threads(2)
V = 1 << 22


def address_space() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))


logits = torch.randn(1, V)
cond, uncond = torch.randn(1, 1, V, dtype=torch.float16), torch.randn(1, 1, V, dtype=torch.float16)
tokens = torch.full((1, 1), V)
router = torch.randn(1, V)
group = torch.zeros(1, dtype=torch.int64)
cases = {
    "sample_next_token": lambda: ops.sample_next_token(logits, seed=0),
    "sample_next_token top_k": lambda: ops.sample_next_token(logits, top_k=5, top_p=0.9, seed=0),
    "sample_next_token greedy": lambda: ops.sample_next_token(logits, temperature=0, seed=0),
    "maskgit_step guided fp16": lambda: ops.maskgit_step(cond, tokens, 0, 4, uncond_logits=uncond,
                                                         guidance_scale=2.0, mask_id=V, seed=0),
    "moe_gate": lambda: ops.moe_gate(router, group, num_groups=1, top_k=1),
}
# Every case works without the cap (and the OpenMP threads exist before it).
for call in cases.values():
    call()
# The moe_gate outputs (about 12 bytes per expert) and its partial sums (about as much) fit under the cap;
# its per-thread scratch does not. The sampling ops allocate nothing but scratch of >= 4 bytes per logit.
headroom = {"moe_gate": 24 * V + (8 << 20)}
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
raised = {}
for name, call in cases.items():
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + headroom.get(name, 8 << 20), hard))
    try:
        call()
        raised[name] = "nothing"
    except Exception as e:
        raised[name] = f"{type(e).__name__}: {e}"
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
raised["after"] = ops.sample_next_token(torch.tensor([[0.0, 50.0, 0.0]]), seed=0).tolist()
print(json.dumps(raised))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""), reason="ASan reserves terabytes of address space")
def test_failed_scratch_allocation_raises_memory_error():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert proc.returncode == 0, f"child died with {proc.returncode}:\n{proc.stderr[-3000:]}"
    raised = json.loads(proc.stdout.strip().splitlines()[-1])
    assert raised.pop("after") == [1]
    for name, what in raised.items():
        assert what.startswith("MemoryError"), (name, what)
    assert "sample_next_token: out of memory" in raised["sample_next_token"]
    assert "maskgit_step: out of memory" in raised["maskgit_step guided fp16"]
