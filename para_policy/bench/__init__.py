"""The benchmarks' library: record a stream, replay it warm-started on the same noise, write the report.

``eval/bench_*.py`` are each a list of variants (sampler specs) and a table; what they share
lives here:

- :mod:`~para_policy.bench.stream`: record a PushT observation stream (the env is imported
  only when recording), save and load it as JSON, split off a calibration episode;
- :mod:`~para_policy.bench.noise`: one noise-key scheme, a seed per (chunk, row);
- :mod:`~para_policy.bench.schedules`: ``ddpm100`` / ``ddim10`` / ``dpm2-10`` and specs on them;
- :mod:`~para_policy.bench.replay`: the warm-started, interleaved replay loop;
- :mod:`~para_policy.bench.report`: percentile summaries, markdown tables, atomic JSON + markdown.

Nothing here imports :mod:`para_policy.evaluation` (gymnasium, hydra, wandb): a bare GPU
machine with torch and the core runs the replay and writes the reports.
"""

from para_policy.bench.noise import ChunkKeys, chunk_noise, keyed_noise, seed_for
from para_policy.bench.replay import (
    Outcome,
    Variant,
    deviations,
    executed_actions,
    predict_call,
    replay,
    resolve_paradigms,
    run_chunk,
    sampler_call,
)
from para_policy.bench.report import (
    command_line,
    machine_info,
    markdown_table,
    mean_max,
    shown_path,
    write_json,
    write_report,
    write_text,
)
from para_policy.bench.schedules import parse_schedule, schedule_label, schedule_order, schedule_spec
from para_policy.bench.stream import (
    RECORD_KEYS,
    ROLLOUT_KEYS,
    episodes_of,
    load_stream,
    record_stream,
    save_stream,
    split_stream,
    spread,
)
from para_policy.stats import percentile, percentile_summary  # the one summary, re-exported for the scripts

__all__ = [
    "RECORD_KEYS",
    "ROLLOUT_KEYS",
    "ChunkKeys",
    "Outcome",
    "Variant",
    "chunk_noise",
    "command_line",
    "deviations",
    "episodes_of",
    "executed_actions",
    "keyed_noise",
    "load_stream",
    "machine_info",
    "markdown_table",
    "mean_max",
    "parse_schedule",
    "percentile",
    "predict_call",
    "record_stream",
    "replay",
    "resolve_paradigms",
    "run_chunk",
    "sampler_call",
    "save_stream",
    "schedule_label",
    "schedule_order",
    "schedule_spec",
    "seed_for",
    "shown_path",
    "split_stream",
    "spread",
    "percentile_summary",
    "write_json",
    "write_report",
    "write_text",
]
