"""The stage benchmark's smoke run (``eval/bench_stages.py --quick``) on the shipped policy."""

from __future__ import annotations

import gc
import importlib.util
import threading
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "bench_stages.py"


def test_quick_run_prints_the_cost_terms_and_every_variant(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_stages", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gc.collect()  # other tests' pipelines left for the collector end their workers now
    before = threading.active_count()
    module.main(["--quick", "--chunks", "2"])
    out = capsys.readouterr().out
    for text in ("hand-off", "stage 0", "sequential ORT 2 threads", "asyncdiff 2 stages exact", "| ddim10 |"):
        assert text in out
    assert threading.active_count() <= before + 2  # the two policies' kept stage workers at most
