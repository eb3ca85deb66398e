"""The loss curve of a run as a PNG beside its `log.csv` (`loss.png`), drawn with Pillow: each logged mean loss
over the steps, on a log scale (a diffusion loss falls fast, then slowly), with a moving average over 10 rows
drawn over it and the first, last and lowest values written out."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw

from ..files import atomic_write

WIDTH, HEIGHT, MARGIN = 720, 360, 56


def read_log(path: Path) -> list[tuple[int, float]]:
    """(step, loss) rows of a log.csv; rows that are not numbers (a torn last line) are left out."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step, loss = int(row["step"]), float(row["loss"])
            except (TypeError, ValueError):
                continue
            if math.isfinite(loss) and loss > 0:
                rows.append((step, loss))
    return rows


def moving_average(values: list[float], window: int = 10) -> list[float]:
    """Mean of each value and the window − 1 before it (fewer at the start)."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def plot_loss(log: Path, png: Path) -> None:
    """Draw log.csv's loss over the steps into png (written atomically); nothing with fewer than two rows."""
    rows = read_log(log)
    if len(rows) < 2:
        return
    steps, losses = [s for s, _ in rows], [v for _, v in rows]
    low, high = math.log10(min(losses)), math.log10(max(losses))
    high = high if high > low else low + 1

    def point(step: int, loss: float) -> tuple[float, float]:
        x = MARGIN + (step - steps[0]) / max(1, steps[-1] - steps[0]) * (WIDTH - 2 * MARGIN)
        y = HEIGHT - MARGIN - (math.log10(loss) - low) / (high - low) * (HEIGHT - 2 * MARGIN)
        return x, y

    im = Image.new("RGB", (WIDTH, HEIGHT), "white")
    d = ImageDraw.Draw(im)
    d.rectangle((MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN), outline=(160, 160, 160))
    d.line([point(s, v) for s, v in rows], fill=(170, 190, 230), width=1)
    d.line([point(s, v) for s, v in zip(steps, moving_average(losses))], fill=(30, 70, 180), width=2)
    d.text((MARGIN, 8), f"loss (log scale) over {steps[-1]} steps, moving average of 10 rows", fill="black")
    d.text((MARGIN, 24), f"first {losses[0]:.4g}   last {losses[-1]:.4g}   lowest {min(losses):.4g}", fill="black")
    d.text((4, MARGIN - 6), f"{10**high:.3g}", fill="black")
    d.text((4, HEIGHT - MARGIN - 6), f"{10**low:.3g}", fill="black")
    d.text((MARGIN, HEIGHT - MARGIN + 6), str(steps[0]), fill="black")
    d.text((WIDTH - MARGIN - 30, HEIGHT - MARGIN + 6), str(steps[-1]), fill="black")
    with atomic_write(png) as tmp:
        im.save(tmp, format="PNG")
