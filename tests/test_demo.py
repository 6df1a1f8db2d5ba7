"""`unif2ace demo --quick`: the whole pipeline end to end in under two minutes; a second run is cached; stages are
cached by their settings, so a run with other settings in the same folder rebuilds what differs."""
import dataclasses
import json
import os
import time

from test_train_helpers import one_thread  # noqa: F401  (autouse fixture)
from unif2ace.cli import main
from unif2ace.training.demo import RUN_SETTINGS, STAGE_OUTPUTS, STAGES, DemoConfig, Stages, stage_keys


def test_demo_quick(tmp_path, capsys):
    out = str(tmp_path / "demo")
    t0 = time.time()
    assert main(["demo", "--quick", "--out-dir", out, "--threads", "1"]) == 0
    elapsed = time.time() - t0
    captured = capsys.readouterr()
    assert elapsed < 120, elapsed
    assert os.path.exists(os.path.join(out, "demo_grid.png"))
    for name in ("eval.json", "eval_table.md"):
        assert os.path.exists(os.path.join(out, "eval", name))
    assert "Generation attribute accuracy" in captured.out and "Stage wall times" in captured.out
    # a redirected log stays short: no progress redraws, a few lines per loop
    log = (captured.out + captured.err).replace("\r", "\n")
    assert "\r" not in captured.err and len(log.splitlines()) < 120
    # demo_config.json tells the truth about the data
    with open(os.path.join(out, "demo_config.json")) as f:
        recorded = json.load(f)
    with open(os.path.join(out, "data", "index.jsonl")) as f:
        assert sum(1 for _ in f) == recorded["num_images"] == DemoConfig.quick().num_images
    with open(os.path.join(out, "pipeline", "generation_config.json")) as f:
        assert json.load(f) == {"num_inference_steps": recorded["sample_steps"],
                                "guidance_scale": recorded["guidance_scale"],
                                "temperature": recorded["sample_temperature"]}
    # the trained Face encoder travels with the pipeline
    assert os.path.isfile(os.path.join(out, "pipeline", "face_encoder", "model.safetensors"))
    # the probes docs/ablations.md quotes run on a finished demo folder
    import argparse

    from benchmarks import demo_probes

    capsys.readouterr()
    demo_probes.tokenizer(argparse.Namespace(demo_dir=out))
    demo_probes.sampling(argparse.Namespace(demo_dir=out, num=4, steps=2, guidance=[1.0], temperatures=[0.5]))
    probes = capsys.readouterr().out
    assert "judge on reconstructions" in probes and "PSNR" in probes and "| 1.0 | " in probes
    t0 = time.time()
    assert main(["demo", "--quick", "--out-dir", out, "--threads", "1"]) == 0
    assert time.time() - t0 < 10
    assert "[train] cached" in capsys.readouterr().out


def test_every_setting_belongs_to_a_stage():
    placed = [f for fields, _ in STAGES.values() for f in fields] + list(RUN_SETTINGS)
    assert sorted(placed) == sorted(f.name for f in dataclasses.fields(DemoConfig))  # each exactly once
    assert set(STAGE_OUTPUTS) == set(STAGES)


def test_quick_and_full_differ_in_every_stage():
    quick, full = stage_keys(DemoConfig.quick("x")), stage_keys(DemoConfig("x"))
    assert all(quick[s] != full[s] for s in STAGES)
    assert stage_keys(DemoConfig("x")) == stage_keys(DemoConfig("y", threads=3))  # where and how fast: no key


def fake_demo(cfg: DemoConfig, calls: list, fail: str = ""):
    """The demo's stage sequence with stand-in stage functions that write each stage's outputs."""
    stages = Stages(cfg)
    for name in STAGES:
        def fn(name=name):
            calls.append(name)
            if name == fail:
                raise KeyboardInterrupt
            for rel in STAGE_OUTPUTS[name]:
                path = os.path.join(cfg.out, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if os.path.isdir(path):  # kept from an interrupted run
                    path = os.path.join(path, "written")
                with open(path, "a") as f:
                    f.write(f"{name} written with {cfg.num_images} images\n")
        stages.run(name, fn)


def test_stage_cache_follows_the_settings(tmp_path, capsys):
    out = str(tmp_path)
    quick = DemoConfig.quick(out)
    calls = []
    fake_demo(quick, calls)
    assert calls == list(STAGES)
    calls.clear()
    fake_demo(quick, calls)                                    # same settings: everything cached
    assert calls == []
    assert "[data] cached" in capsys.readouterr().out

    # an evaluation setting changes: only eval reruns
    fake_demo(dataclasses.replace(quick, num_vqa=quick.num_vqa + 1), calls)
    assert calls == ["eval"]
    assert "num_vqa 32 → 33" in capsys.readouterr().out
    calls.clear()

    # the full demo's settings in the quick demo's folder: every stage rebuilt, old outputs removed first
    full = DemoConfig(out=out)
    fake_demo(full, calls)
    assert calls == list(STAGES)
    text = capsys.readouterr().out
    assert f"[data] settings differ from the cached run (num_images {quick.num_images} → {full.num_images}" in text
    assert "[train] settings differ from the cached run (model_overrides changed; steps 30 → 3000" in text
    with open(os.path.join(out, "data")) as f:
        assert f.read() == f"data written with {full.num_images} images\n"   # rebuilt from nothing, not appended to
    records = json.load(open(os.path.join(out, "stages.json")))
    assert records["data"]["settings"]["num_images"] == full.num_images and all(r["done"] for r in records.values())


def test_interrupted_stage_reruns_in_place(tmp_path, capsys):
    cfg = DemoConfig.quick(str(tmp_path))
    calls = []
    try:
        fake_demo(cfg, calls, fail="train")
    except KeyboardInterrupt:
        pass
    # the partial training output stays (training resumes from its checkpoints), the finished stages are cached
    os.makedirs(os.path.join(str(tmp_path), "pipeline", "checkpoints"))
    calls.clear()
    fake_demo(cfg, calls)
    assert calls == ["train", "eval"]
    assert os.path.isdir(os.path.join(str(tmp_path), "pipeline", "checkpoints"))
    assert "[train] resuming an unfinished run" in capsys.readouterr().out
