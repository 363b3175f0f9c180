"""Reading a dataset's published files: errors that name the file, and JSON lines with one problem per bad line.

A converter reads its inputs when it plans, before any shard is written, so a wrong or missing
file stops the conversion with one message naming it. In JSON lines files a bad line is only one
record: it becomes a listed ``Problem`` and the rest of the file is still read.
"""
from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from soho.data.convert.writer import Problem


def require_file(path: Path, what: str, hint: str = "") -> None:
    """``FileNotFoundError`` "<what> not found: <path> (<hint>)" unless ``path`` is a file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}" + (f" ({hint})" if hint else ""))


def load_json(path: Path, what: str) -> Any:
    """The content of the JSON file ``path``; an error naming the file when it is missing or not UTF-8 JSON."""
    require_file(path, what)
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def read_json_lines(path: Path) -> Iterator[Tuple[int, Union[Dict[str, Any], Problem]]]:
    """(line number, parsed object or the ``bad_json`` problem with it) for every non-blank line, streamed.

    Lines are decoded one at a time, so a line that is not UTF-8 is one listed problem and not the
    end of the file (UTF-8 never has a newline byte inside a character, so splitting bytes is safe)."""
    with open(path, "rb") as stream:
        for number, data in enumerate(stream, start=1):
            key, where = f"{path.name}:{number}", f"{path}:{number}"
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as error:
                yield number, Problem(key, "bad_json", f"{where}: not UTF-8 ({error})")
                continue
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as error:
                yield number, Problem(key, "bad_json", f"{where}: {error}")
                continue
            if not isinstance(example, dict):
                yield number, Problem(key, "bad_json", f"{where}: not a JSON object")
                continue
            yield number, example


def first_json_line(path: Path) -> Optional[Dict[str, Any]]:
    """The first non-blank line of ``path`` as an object, or ``None`` when it is not one (or there is none).

    What a converter checks a JSON lines file's layout by, before any work: a re-packaged file of
    another project (one JSON array) or the wrong dataset's file fails here."""
    with closing(read_json_lines(path)) as lines:
        _, first = next(lines, (0, None))
    return first if isinstance(first, dict) else None
