"""Report files of the benchmarks: markdown tables, JSON + markdown written atomically (summaries: para_policy.stats).

Every benchmark writes a markdown report (with the command that made it, so the file says how
to reproduce it) and usually the JSON it was rendered from, each with
:func:`~para_policy.checkpoints.atomic_write`: a run killed halfway leaves the previous file,
never a torn one. Light on imports, so a bare GPU machine writes its reports too.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from para_policy.checkpoints import atomic_write


def mean_max(values: Sequence[float], fmt: str = ".3f") -> str:
    """``'mean / max'`` of ``values`` in ``fmt``, ``'—'`` when empty."""
    if not values:
        return "—"
    return f"{format(statistics.mean(values), fmt)} / {format(max(values), fmt)}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table's lines: ``| a | b |``, ``|---|---|``, then one line per row (cells as ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def command_line(script: str, argv: Sequence[str]) -> str:
    """``python eval/<script> <argv...>``: the command a report records (argv joined as given)."""
    return " ".join([f"python eval/{script}", *argv])


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)  # paths, dtypes, devices, anything else: as its text


def write_text(path: str | Path, text: str) -> Path:
    """``text`` at ``path`` (folders made), atomically."""
    return atomic_write(path, lambda p: Path(p).write_text(text))


def write_json(path: str | Path, data: Any, indent: int = 1) -> Path:
    """``data`` as JSON at ``path`` (numpy values as plain values, anything else JSON lacks as its text), atomically."""
    text = json.dumps(data, indent=indent, default=_json_default)
    return atomic_write(path, lambda p: Path(p).write_text(text))


def write_report(stem: str | Path, markdown: str, data: Any = None, indent: int = 1) -> Path:
    """``<stem>.json`` (when ``data`` is given) then ``<stem>.md``, each atomically; returns the md's path.

    The JSON goes first, so a markdown report on disk always has its data beside it.
    """
    stem = Path(stem)
    if data is not None:
        write_json(stem.with_name(stem.name + ".json"), data, indent=indent)
    return write_text(stem.with_name(stem.name + ".md"), markdown)


def machine_info() -> dict[str, Any]:
    """What timings were measured on: torch and its threads, CPUs, platform, processor, load average."""
    info: dict[str, Any] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "processor": platform.processor() or platform.machine()}
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_avg"] = None
    return info


def shown_path(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root`` when inside it (reports name no home folders), else as given."""
    p = Path(path).resolve()
    return str(p.relative_to(Path(root).resolve())) if p.is_relative_to(Path(root).resolve()) else str(path)
