"""Latency summaries and plain-text tables shared by the device runner, the deployment
measurement, the export report and the head benchmark."""

import numpy as np

from tfsplit.device.spec import DeviceError


def latency_summary(seconds):
    """p50, p95 and mean of a list of durations, in milliseconds.

    Raises:
      DeviceError: no durations, or negative / non-finite ones.
    """
    values = np.asarray(seconds, np.float64) * 1e3
    if values.ndim != 1 or not values.size or not np.isfinite(values).all() or values.min() < 0:
        raise DeviceError(
            "Latencies must be a non-empty list of finite durations >= 0. "
            f"Received: {seconds!r:.80}"
        )
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "mean_ms": float(values.mean())}


def latency_columns(stage="", title="", stats=("p50", "p95")):
    """`format_table` columns of one stage's `latency_summary`, e.g. ("head_p50_ms", "head p50").

    Args:
      stage: the key prefix ("" for an unprefixed summary, titled "p50 ms").
      title: the title prefix; the stage by default.
      stats: which of p50, p95 and mean.
    """
    prefix, title = (f"{stage}_" if stage else ""), title or stage
    return tuple(
        (f"{prefix}{stat}_ms", f"{title} {stat}" if title else f"{stat} ms", ".3f")
        for stat in stats
    )


def format_table(rows, columns):
    """Rows (dicts) as a plain-text table: a header, a rule, one line per row.

    Args:
      rows: list of dicts.
      columns: list of (key, title) or (key, title, format spec) such as ("p50_ms", "p50 ms",
        ".2f"); without a spec a value is shown as `str` shows it.
    """
    cells = [[title for _, title, *_ in columns]]
    cells += [[format(row[key], *spec) for key, _, *spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)
