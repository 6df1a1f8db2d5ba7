"""`unif2ace demo --quick`: the whole pipeline end to end in under two minutes; a second run is cached."""
import os
import time

from test_train_helpers import one_thread  # noqa: F401  (autouse fixture)
from unif2ace.cli import main


def test_demo_quick(tmp_path, capsys):
    out = str(tmp_path / "demo")
    t0 = time.time()
    main(["demo", "--quick", "--out", out])
    elapsed = time.time() - t0
    text = capsys.readouterr().out
    assert elapsed < 120, elapsed
    assert os.path.exists(os.path.join(out, "demo_grid.png"))
    for name in ("eval.json", "eval_table.md"):
        assert os.path.exists(os.path.join(out, "eval", name))
    assert "Generation attribute accuracy" in text and "Stage wall times" in text
    t0 = time.time()
    main(["demo", "--quick", "--out", out])
    assert time.time() - t0 < 10
    assert "[train] cached" in capsys.readouterr().out
