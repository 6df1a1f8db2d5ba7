"""The out dir of a run (training/run_dir.py): one run per dir, a lock, damaged checkpoints and logs survived, stale
temporaries removed, the export swapped in whole, and TrainConfig validated in one place. In-process; the kill
tests are in test_train_kills.py."""
import json
import os
import shutil

import pytest
import torch

from test_train_helpers import one_thread, read_log, tiny_config  # noqa: F401 (one_thread: autouse fixture)
from unif2ace.model.checkpoint import CheckpointError
from unif2ace.training import TrainConfig, checkpoint, train
from unif2ace.training.run_dir import RunDir, RunDirError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rundir"))


@pytest.fixture(scope="module")
def finished(root):
    """A finished 6-step run (checkpoints 3 and 6, exported), copied by the tests that damage it."""
    out = os.path.join(root, "finished")
    train(tiny_config(root, out))
    return out


def copy_run(finished, root, name):
    out = os.path.join(root, name)
    shutil.copytree(finished, out)
    return out


def losses(out):
    return [(r["step"], r["loss"]) for r in read_log(out)]


def test_fresh_run_refused_over_an_existing_one(root, finished):
    out = copy_run(finished, root, "refuse")
    before = open(os.path.join(out, "train_log.jsonl")).read()
    with pytest.raises(RunDirError, match=r"already holds a training run .*--resume.*--overwrite"):
        train(tiny_config(root, out, steps=3))
    assert open(os.path.join(out, "train_log.jsonl")).read() == before  # nothing touched
    # --overwrite: the old run's files go first; rotation then sees only the new run's steps
    train(tiny_config(root, out, steps=4, checkpoint_every=2, overwrite=True, seed=1))
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4]
    ckpts = checkpoint.list_checkpoints(out)
    assert [checkpoint.step_of(c) for c in ckpts] == [2, 4]
    assert all(checkpoint.load(c)[2]["train_config"]["seed"] == 1 for c in ckpts)


def test_second_run_on_a_locked_dir_is_refused(root, finished):
    out = copy_run(finished, root, "locked")
    with RunDir(out) as holder:
        holder.open(resume=True)
        with pytest.raises(RunDirError, match=rf"in use by another training run \(pid {os.getpid()} on "):
            train(tiny_config(root, out, resume=True, steps=7))
    # the lock ends with its holder: nothing stale is left behind
    train(tiny_config(root, out, resume=True, steps=7))
    assert [s for s, _ in losses(out)] == list(range(1, 8))


DAMAGES = {
    "empty checksums.json": lambda d: open(os.path.join(d, "checksums.json"), "w").close(),
    "checksums.json not JSON": lambda d: open(os.path.join(d, "checksums.json"), "w").write('{"config.json": "ab'),
    "checksums.json a list": lambda d: open(os.path.join(d, "checksums.json"), "w").write("[]"),
    "checksums.json lists nothing": lambda d: open(os.path.join(d, "checksums.json"), "w").write("{}"),
    "trainer.pt missing": lambda d: os.remove(os.path.join(d, "trainer.pt")),
    "config.json missing": lambda d: os.remove(os.path.join(d, "config.json")),
    "weights cut short": lambda d: os.truncate(os.path.join(d, "model.safetensors"), 1000),
    "trainer.pt cut short": lambda d: os.truncate(os.path.join(d, "trainer.pt"), 100),
    "trainer.pt emptied": lambda d: os.truncate(os.path.join(d, "trainer.pt"), 0),
    "folder emptied": lambda d: [os.remove(os.path.join(d, f)) for f in os.listdir(d)],
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_falls_back_past_a_damaged_checkpoint(root, finished, damage):
    out = copy_run(finished, root, "damaged-" + damage.replace(" ", "_"))
    newest = checkpoint.list_checkpoints(out)[-1]
    DAMAGES[damage](newest)
    with pytest.raises(CheckpointError):
        checkpoint.load(newest)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        found = checkpoint.load_latest(out)
    assert checkpoint.step_of(found[0]) == 3 and found[3]["step"] == 3


def test_a_checkpoint_with_another_steps_state_is_refused(root, finished):
    out = copy_run(finished, root, "swapped")
    a, b = checkpoint.list_checkpoints(out)
    shutil.copy(os.path.join(a, "trainer.pt"), os.path.join(b, "trainer.pt"))
    sums = {f: checkpoint._sha256(os.path.join(b, f)) for f in ("config.json", "model.safetensors", "trainer.pt")}
    open(os.path.join(b, "checksums.json"), "w").write(json.dumps(sums))
    with pytest.raises(CheckpointError, match="trainer.pt holds step 3, not 6"):
        checkpoint.load(b)


def test_resume_after_damage_repeats_the_uninterrupted_run(root, finished):
    """Newest checkpoint damaged, a torn last log line, an unreadable middle line and stale temporaries: resume
    warns about each, keeps the damaged checkpoint aside and ends with the losses of the uninterrupted run."""
    out = copy_run(finished, root, "repair")
    ckpt = os.path.join(out, "checkpoints")
    open(os.path.join(ckpt, "step_0000006", "checksums.json"), "w").close()
    log = os.path.join(out, "train_log.jsonl")
    lines = open(log).read().splitlines(keepends=True)
    open(log, "w").write("".join(lines[:1] + ["not json\n"] + lines[1:]) + '{"step": 7, "loss": 1.2')
    os.makedirs(os.path.join(ckpt, ".step_0000009.tmp-99999-abcd"))
    os.makedirs(os.path.join(out, ".model.tmp-99999-abcd"))
    with pytest.warns(UserWarning) as caught:
        train(tiny_config(root, out, resume=True))
    said = "\n".join(str(w.message) for w in caught)
    for expected in ("skipping damaged checkpoint", "renamed to", "step_0000009.tmp-", ".model.tmp-",
                     "dropped line 2", "dropped its last line (torn"):
        assert expected in said, expected
    assert losses(out) == losses(finished)
    assert sorted(os.listdir(ckpt)) == ["damaged-step_0000006", "step_0000003", "step_0000006"]
    assert not [n for n in os.listdir(out) if ".tmp-" in n]


def test_a_directory_moved_aside_is_restored(root, finished):
    """Where directories cannot be exchanged atomically, the old one is moved aside for an instant; if the writer
    dies then, the next run puts it back."""
    out = copy_run(finished, root, "aside")
    os.rename(os.path.join(out, "model"), os.path.join(out, ".model.old-99999-abcd"))
    with pytest.warns(UserWarning, match=r"\.model\.old-"):
        RunDir(out).open(resume=True)
    from unif2ace import FacePipeline

    FacePipeline.from_pretrained(out)


def test_failed_export_keeps_the_previous_pipeline(root, finished, monkeypatch):
    from unif2ace import FacePipeline
    from unif2ace.tokenizers import TextTokenizer

    out = copy_run(finished, root, "export")
    before = {n: open(os.path.join(out, "model", n), "rb").read() for n in os.listdir(os.path.join(out, "model"))}

    def broken(self, directory):
        open(os.path.join(directory, "tokenizer.json"), "w").write("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TextTokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match=r"the pipeline export could not be written .*the disk is full .*the last good "
                                      r"checkpoint is .*step_0000007"):
        train(tiny_config(root, out, resume=True, steps=7))
    assert sorted(n for n in os.listdir(out) if ".tmp-" in n) == []
    assert {n: open(os.path.join(out, "model", n), "rb").read() for n in before} == before
    pipe = FacePipeline.from_pretrained(out)
    assert len(pipe.generate("happy face", steps=1)) == 1


@pytest.mark.parametrize("flag,value,message", [
    ("checkpoint_every", 0, "checkpoint_every must be an int >= 1, got 0"),
    ("steps", 0, "steps must be an int >= 1, got 0"),
    ("keep_checkpoints", -1, "keep_checkpoints must be an int >= 0"),
    ("lr", float("nan"), "lr must be a number in (0, inf), got nan"),
    ("beta2", 1.0, "beta2 must be a number in [0, 1), got 1.0"),
    ("max_seconds", -1.0, "max_seconds must be a number in [0, inf]"),
    ("device", "gpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("precision", "fp8", "precision must be one of"),
    ("out_dir", "", "out_dir must be a path"),
])
def test_train_config_names_the_bad_field(flag, value, message):
    with pytest.raises(ValueError) as e:
        TrainConfig(**{flag: value})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_train_config_reports_every_problem_at_once():
    with pytest.raises(ValueError, match=r"^TrainConfig: steps .*; checkpoint_every .*; resume and overwrite"):
        TrainConfig(steps=0, checkpoint_every=0, resume=True, overwrite=True)


def test_cli_reports_bad_flags_and_a_held_dir_in_one_line(root, finished, tmp_path, capsys):
    from unif2ace.cli import main

    paths = ["--data-dir", os.path.join(root, "data"), "--tokenizer-dir", os.path.join(root, "tokenizers")]
    out = str(tmp_path / "never")
    for flags, message in ((["--checkpoint-every", "0"], "checkpoint_every must be an int >= 1, got 0"),
                           (["--steps", "0"], "steps must be an int >= 1, got 0"),
                           (["--resume", "--overwrite"], "resume and overwrite exclude each other")):
        assert main(["train", "--out-dir", out, *paths, *flags]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"unif2ace train: error: TrainConfig: {message}"
    assert not os.path.exists(out)
    assert main(["train", "--out-dir", finished, *paths]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"unif2ace train: error: {finished} already holds a training run") and "--overwrite" in err


def test_a_damaged_token_cache_is_rebuilt(root, finished):
    cache = os.path.join(root, "cache")
    (name,) = [n for n in os.listdir(cache) if n.startswith("tokens-")]
    os.truncate(os.path.join(cache, name), 100)  # what a power loss can leave of an unsynced file
    with pytest.warns(UserWarning, match="token cache .* cannot be read"):
        train(tiny_config(root, os.path.join(root, "cache-rebuilt"), steps=1))
    assert sorted(os.listdir(cache)) == [name] and torch.load(os.path.join(cache, name))["codes"].shape[0] > 0


def test_resume_with_fewer_steps_than_done_is_refused_untouched(root, finished):
    out = copy_run(finished, root, "fewer")
    log = open(os.path.join(out, "train_log.jsonl")).read()
    with pytest.raises(ValueError, match=r"steps=4 ends before the step 6 of the checkpoint .*raise --steps"):
        train(tiny_config(root, out, resume=True, steps=4))
    assert open(os.path.join(out, "train_log.jsonl")).read() == log
    assert [checkpoint.step_of(c) for c in checkpoint.list_checkpoints(out)] == [3, 6]
