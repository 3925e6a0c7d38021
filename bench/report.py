"""Results of a run: a markdown table for stdout and a JSON document for --json."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Ratio:
    """One figure against its baseline: rates in messages (or calls) per second."""

    name: str
    subject: str
    rate: float
    baseline: str
    baseline_rate: float
    count: int
    notes: str = ""
    runs: list[float] = field(default_factory=list)
    baseline_runs: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.rate / self.baseline_rate if self.baseline_rate else 0.0

    @property
    def segment_ratios(self) -> list[float]:
        """The ratio of each interleaved segment, where both sides ran one after the other."""
        if len(self.runs) != len(self.baseline_runs):
            return []
        return [a / b for a, b in zip(self.runs, self.baseline_runs, strict=True) if b]

    @property
    def spread(self) -> tuple[float, float, float] | None:
        """The 25th, 50th and 75th percentiles of the segment ratios."""
        ratios = sorted(self.segment_ratios)
        if len(ratios) < 4:
            return None
        low, median, high = statistics.quantiles(ratios, n=4)
        return low, median, high


@dataclass
class Memory:
    """Peak RSS of the drainer process for two backlog sizes."""

    name: str
    small_count: int
    small_peak_mib: float
    large_count: int | None
    large_peak_mib: float | None
    small_rate: float = 0.0
    large_rate: float | None = None
    notes: str = ""

    @property
    def difference_mib(self) -> float | None:
        if self.large_peak_mib is None:
            return None
        return self.large_peak_mib - self.small_peak_mib


@dataclass
class Results:
    ratios: list[Ratio] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)
    latencies: list[Any] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": machine(),
            "settings": self.settings,
            "ratios": [
                {**asdict(r), "ratio": round(r.ratio, 4), "segment_ratio_quartiles": r.spread}
                for r in self.ratios
            ],
            "memory": [{**asdict(m), "difference_mib": m.difference_mib} for m in self.memory],
            "latency": [asdict(latency) for latency in self.latencies],
        }

    def write_json(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    def markdown(self) -> str:
        lines: list[str] = []
        if self.ratios:
            lines += [
                "| figure | measured | rate | baseline | baseline rate | ratio | segment ratios: median (p25-p75) | n |",
                "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
            ]
            for r in self.ratios:
                spread = (
                    f"{r.spread[1]:.2f} ({r.spread[0]:.2f}-{r.spread[2]:.2f})"
                    if r.spread
                    else "n/a"
                )
                lines.append(
                    f"| {r.name} | {r.subject} | {_rate(r.rate)} | {r.baseline} | "
                    f"{_rate(r.baseline_rate)} | {r.ratio:.2f} | {spread} | {r.count:,} |"
                )
        if self.memory:
            if lines:
                lines.append("")
            lines += [
                "| figure | backlog | peak RSS | drain rate | backlog | peak RSS | drain rate | difference |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            ]
            for m in self.memory:
                if m.large_count is None or m.large_peak_mib is None:
                    large = "| (--memory-large) | | |"
                    difference = "n/a"
                else:
                    large = (
                        f"| {m.large_count:,} | {m.large_peak_mib:.1f} MiB | "
                        f"{_rate(m.large_rate or 0.0)} |"
                    )
                    difference = f"{m.difference_mib:+.1f} MiB"
                lines.append(
                    f"| {m.name} | {m.small_count:,} | {m.small_peak_mib:.1f} MiB | "
                    f"{_rate(m.small_rate)} {large} {difference} |"
                )
        if self.latencies:
            from bench.latency import MARKDOWN_HEADER

            if lines:
                lines.append("")
            lines += [MARKDOWN_HEADER, *(latency.markdown_row() for latency in self.latencies)]
        notes = [f"- {r.name}: {r.notes}" for r in self.ratios if r.notes]
        notes += [f"- {m.name}: {m.notes}" for m in self.memory if m.notes]
        if notes:
            lines += ["", *notes]
        return "\n".join(lines)


def _rate(value: float) -> str:
    return f"{value:,.0f}/s"


def machine() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
