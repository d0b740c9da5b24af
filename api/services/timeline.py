"""The timeline picture of a video prediction: fake probability over time (matplotlib, Agg).

Built with matplotlib's object API (a Figure with its own Agg canvas), not pyplot: pyplot keeps
global state and is not safe in a threaded server; a Figure is local to the call.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

WIDTH_PX, HEIGHT_PX, DPI = 1000, 320, 100


def render_timeline(frames: Sequence[dict[str, Any]], segments: Sequence[dict[str, Any]], duration_s: float,
                    threshold: float, title: str = "") -> bytes:
    """PNG bytes, WIDTH_PX x HEIGHT_PX: per-frame probability, the threshold line, fake segments shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for number, segment in enumerate(segments):
        axes.axvspan(segment["start_s"], segment["end_s"], color="#d62728", alpha=0.18, linewidth=0,
                     label="fake segment" if number == 0 else None)
    times = [frame["timestamp_s"] for frame in frames]
    probabilities = [frame["fake_probability"] for frame in frames]
    axes.plot(times, probabilities, color="#1f77b4", marker="o", markersize=3, linewidth=1.4,
              label="fake probability")
    axes.axhline(threshold, color="#d62728", linestyle="--", linewidth=1.0, label=f"threshold {threshold:g}")
    axes.set_xlim(0.0, max(duration_s, max(times, default=0.0), 1e-3))
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("time (s)")
    axes.set_ylabel("fake probability")
    axes.grid(True, alpha=0.3)
    # Above the plot, so it never hides a point.
    axes.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=8, frameon=False)
    if title:
        axes.set_title(title, fontsize=10, loc="left")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)  # no bbox_inches: the size stays exactly as declared
    return buffer.getvalue()
