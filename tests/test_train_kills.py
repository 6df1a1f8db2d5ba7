"""kill -9 at chosen moments of a training run, each followed by --resume: no logged step or complete checkpoint is
lost, the exported pipeline is always the previous or the new complete one, and the run ends exactly as an
uninterrupted one. Also two runs on one out dir, and a full or read-only disk.

The runs are forked from one child process that has imported everything once (a fresh interpreter per run would
cost seconds each); each fork patches the function at whose moment it kills itself with SIGKILL.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from test_train_helpers import read_log, tiny_setup

TESTS = os.path.dirname(os.path.abspath(__file__))

ZYGOTE = r"""
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[3])
import torch
torch.set_num_threads(1)
from test_train_helpers import tiny_config
from unif2ace import FacePipeline, durable
from unif2ace.tokenizers import TextTokenizer
from unif2ace.training import checkpoint, train, trainer

root, out, ref = sys.argv[1], sys.argv[2], os.path.join(sys.argv[1], "reference")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def fork(fn):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            message = "returned " + json.dumps(fn())
        except BaseException as e:
            message = f"raised {type(e).__name__}: {e}"
        os.write(w, message.encode()[:4000])
        os._exit(0)
    os.close(w)
    return pid, r


def finish(pid, r):
    _, status = os.waitpid(pid, 0)
    text = os.read(r, 8192).decode()
    os.close(r)
    return "killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else text


def run(patch=None, directory=out, **changes):
    def go():
        if patch is not None:
            patch()
        return train(tiny_config(root, directory, **{"steps": 9, **changes}))["step"]
    return finish(*fork(go))


def state():
    log, ckpts = os.path.join(out, "train_log.jsonl"), os.path.join(out, "checkpoints")
    return {"log": [json.loads(line)["step"] for line in open(log) if line.strip()] if os.path.exists(log) else None,
            "checkpoints": sorted(os.listdir(ckpts)) if os.path.isdir(ckpts) else [],
            "temporaries": sorted(n for n in os.listdir(out) if durable.is_temporary(n))}


def pipeline():
    try:
        pipe = FacePipeline.from_pretrained(out)
        return f"{len(pipe.generate('happy face', steps=1))} image"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def kill_in_trainer_save():  # trainer.pt of checkpoint 6 half written
    original = durable.torch_save
    def partial(obj, path):
        if "step_0000006" in path:
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04" + bytes(1000))
            die()
        original(obj, path)
    durable.torch_save = partial


def kill_in_log_rewrite():  # the resume-time rewrite of train_log.jsonl, its new copy half written
    original = durable.write_file
    def partial(path, data):
        if path.endswith("train_log.jsonl"):
            with open(durable.temporary_name(path), "w") as f:
                f.write(data[: len(data) // 2])
            die()
        original(path, data)
    durable.write_file = partial


def kill_in_rotation():  # checkpoint 9 written, checkpoint 3 half deleted
    original = checkpoint.rotate
    def partial(out_dir, keep, step):
        if step == 9:
            os.remove(os.path.join(checkpoint.step_dir(out_dir, 3), "model.safetensors"))
            die()
        original(out_dir, keep, step)
    checkpoint.rotate = partial


def kill_before_model_swap():  # the export: tokenizers swapped in, the complete new model/ not yet
    original = durable.replace_directory
    def partial(src, dst):
        if os.path.basename(dst) == "model":
            die()
        original(src, dst)
    durable.replace_directory = partial


def kill_in_tokenizer_write():  # the export: text_tokenizer/ half written
    def partial(self, directory):
        open(os.path.join(directory, "tokenizer.json"), "w").write("{")
        die()
    TextTokenizer.save_pretrained = partial


def slow_steps():
    trainer.train_step = lambda *a, **k: time.sleep(600)


report = {"reference": run(directory=ref)}
for name, patch, changes in [("checkpoint write", kill_in_trainer_save, {}),
                             ("log rewrite", kill_in_log_rewrite, {"resume": True}),
                             ("rotation", kill_in_rotation, {"resume": True}),
                             ("first export", kill_before_model_swap, {"resume": True}),
                             ("resume", None, {"resume": True}),
                             ("second export", kill_in_tokenizer_write, {"resume": True, "steps": 10})]:
    report[name] = {"ended": run(patch, **changes), **state(), "pipeline": pipeline()}
    if name == "resume":
        report["model at 9"] = open(os.path.join(out, "model", "model.safetensors"), "rb").read().hex()

# two runs on one out dir: the first holds it (its steps never end), the second is refused
first = fork(lambda: (slow_steps(), train(tiny_config(root, out, steps=11, resume=True))))
lock = os.path.join(out, ".lock")
deadline = time.time() + 120
while time.time() < deadline and f"pid {first[0]} " not in (open(lock).read() if os.path.exists(lock) else ""):
    time.sleep(0.05)
report["second run"] = run(resume=True, steps=11)
os.kill(first[0], signal.SIGKILL)
report["first run"] = finish(*first)
report["after the holder died"] = run(resume=True, steps=11)
report["final"] = state()
print(json.dumps(report))
"""


def test_kills_at_every_moment_then_resume(tmp_path):
    root = str(tmp_path)
    tiny_setup(root)
    out = os.path.join(root, "run")
    proc = subprocess.run([sys.executable, "-c", ZYGOTE, root, out, TESTS], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["reference"] == "returned 9"

    s = report["checkpoint write"]  # every logged step survives, the half-written checkpoint is only a temporary
    assert s["ended"] == "killed" and s["log"] == [1, 2, 3, 4, 5, 6]
    assert [n.split(".tmp-")[0] for n in s["checkpoints"]] == [".step_0000006", "step_0000003"]
    assert s["pipeline"].startswith("FileNotFoundError") and "model/ is missing" in s["pipeline"]

    s = report["log rewrite"]  # the old log is whole; its half-written replacement is a temporary
    assert s["ended"] == "killed" and s["log"] == [1, 2, 3, 4, 5, 6]
    assert [n.split(".tmp-")[0] for n in s["temporaries"]] == [".train_log.jsonl"]

    s = report["rotation"]
    assert s["ended"] == "killed" and s["log"] == list(range(1, 10)) and s["temporaries"] == []
    assert s["checkpoints"] == ["step_0000003", "step_0000006", "step_0000009"]

    s = report["first export"]  # the tokenizers are in, the model is not: the pipeline says so
    assert s["ended"] == "killed" and "model/ is missing" in s["pipeline"]

    s = report["resume"]  # the run completes, with exactly the uninterrupted run's history and weights
    assert s["ended"] == "returned 9" and s["pipeline"] == "1 image"
    assert s["checkpoints"] == ["step_0000003", "step_0000006", "step_0000009"]  # 3 (damaged) goes at the next save
    ref = os.path.join(root, "reference")
    assert [(r["step"], r["loss"], r["lr"]) for r in read_log(out)[:9]] == \
           [(r["step"], r["loss"], r["lr"]) for r in read_log(ref)]
    assert report["model at 9"] == open(os.path.join(ref, "model", "model.safetensors"), "rb").read().hex()

    s = report["second export"]  # killed while text_tokenizer/ was written: the previous export still works
    assert s["ended"] == "killed" and s["log"] == list(range(1, 11)) and s["pipeline"] == "1 image"

    assert report["second run"].startswith("raised RunDirError") and "in use by another training run" in \
        report["second run"]
    assert report["first run"] == "killed"
    assert report["after the holder died"] == "returned 11"
    final = report["final"]
    assert final["log"] == list(range(1, 12)) and final["temporaries"] == []
    assert final["checkpoints"] == ["step_0000010", "step_0000011"]


CHILD_DISK = r"""
import json, os, subprocess, sys
sys.path.insert(0, sys.argv[3])
import torch
torch.set_num_threads(1)
from test_train_helpers import tiny_config
from unif2ace.training import train

root, mount = sys.argv[1], sys.argv[2]
out = os.path.join(mount, "run")
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", mount], check=True)
report = {}
try:
    train(tiny_config(root, out, steps=6, checkpoint_every=3))
except OSError as e:
    report["full"] = str(e)
report["full left"] = sorted(os.listdir(out)) + sorted(os.listdir(os.path.join(out, "checkpoints")))
report["full log"] = [json.loads(line)["step"] for line in open(os.path.join(out, "train_log.jsonl"))]
subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
try:
    train(tiny_config(root, out, steps=6, checkpoint_every=3, resume=True))
except OSError as e:
    report["read-only"] = str(e)
print(json.dumps(report))
"""


def test_full_and_read_only_disks_are_reported(tmp_path):
    """The out dir on a 2.6 MB tmpfs (a private mount namespace): checkpoint 3 fits, checkpoint 6 does not."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare -rm (user and mount namespaces) to mount a small tmpfs")
    root = str(tmp_path)
    tiny_setup(root)
    mount = os.path.join(root, "disk")
    os.makedirs(mount)
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", CHILD_DISK, root, mount, TESTS],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    step3 = os.path.join(mount, "run", "checkpoints", "step_0000003")
    assert report["full"] == (f"[Errno 28] checkpoint 6 could not be written in {os.path.join(mount, 'run')}: the "
                              f"disk is full (No space left on device); the last good checkpoint is {step3}")
    assert report["full left"] == [".lock", "checkpoints", "train_config.json", "train_log.jsonl", "step_0000003"]
    assert report["full log"] == [1, 2, 3, 4, 5, 6]
    assert report["read-only"].startswith("[Errno 30] the out dir could not be written in ")
    assert "the file system is read-only" in report["read-only"]
