"""The web UI's prompt styles: named prompt and negative-prompt texts in a `styles.csv` (columns name, prompt,
negative_prompt), applied to a request's prompts as its `modules/styles.py` applies them: a style's text with a
`{prompt}` in it takes the prompt in that place; one without is appended after a comma."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def read_styles(path: str | os.PathLike) -> dict[str, Style]:
    """A styles.csv -> its styles by name (rows without a name skipped); ValueError naming the file if it cannot be
    read as one."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, skipinitialspace=True))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: cannot read it as a styles.csv ({type(e).__name__})") from None
    if rows and "name" not in rows[0]:
        raise ValueError(f"{path}: a styles.csv needs a header row with name, prompt and negative_prompt")
    styles = {}
    for row in rows:
        if name := (row.get("name") or "").strip():
            prompt = row.get("prompt", row.get("text")) or ""  # ("text": the oldest files' column)
            styles[name] = Style(name, prompt, row.get("negative_prompt") or "")
    return styles


def apply_styles(prompt: str, style_texts: list[str]) -> str:
    """Styles' texts applied in turn, as the web UI's `apply_styles_to_prompt`."""
    for text in style_texts:
        if "{prompt}" in text:
            prompt = text.replace("{prompt}", prompt)
        else:
            prompt = ", ".join(part for part in (prompt.strip(), text.strip()) if part)
    return prompt


def find_styles(value: str | os.PathLike | None, default: str = "styles.csv") -> dict[str, Style]:
    """The styles of a file given (it must exist), else of `default` where it exists, else none."""
    if value is None:
        return read_styles(default) if Path(default).is_file() else {}
    if not Path(value).is_file():
        raise ValueError(f"{value}: no such styles file")
    return read_styles(value)
