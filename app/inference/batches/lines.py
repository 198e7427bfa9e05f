"""The input file of a batch, checked line by line before anything is queued.

Each line is OpenAI's `{"custom_id", "method": "POST", "url", "body"}`. A file with one bad line
is refused whole (400 naming the line, every problem listed in `details`), because a batch that
starts and then fails on line 9,000 has spent quota on the 8,999 before it for nothing. What the
body asks of the model (fields, values, model limits) is checked when the line runs, by the same
schema and service as the HTTP route, and a bad body is that line's 400 in the error file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.errors import APIError

LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})
MAX_CUSTOM_ID = 512
MAX_REPORTED = 20


@dataclass(frozen=True)
class InputLine:
    line: int  # 1-based, as an editor shows it
    custom_id: str
    body: dict[str, Any]


def _check(number: int, text: str, endpoint: str) -> tuple[InputLine | None, str | None]:
    try:
        item = json.loads(text)
    except ValueError as exc:
        return None, f"is not valid JSON ({exc.msg})."
    if not isinstance(item, dict):
        return None, "must be a JSON object."
    unknown = sorted(set(item) - LINE_KEYS)
    if unknown:
        return None, f"has unknown key(s) {', '.join(unknown)}; a line has custom_id, method, url and body."
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        return None, f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters."
    if item.get("method") != "POST":
        return None, f'method must be "POST", got {json.dumps(item.get("method"))}.'
    if item.get("url") != endpoint:
        return None, f"url must be the batch's endpoint {endpoint!r}, got {json.dumps(item.get('url'))}."
    if not isinstance(item.get("body"), dict):
        return None, "body must be a JSON object (the request the endpoint takes)."
    return InputLine(number, custom_id, item["body"]), None


def parse(content: bytes, endpoint: str, max_lines: int) -> list[InputLine]:
    """The file's requests, or 400 naming the first bad line (blank lines are skipped)."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(
            400,
            f"The input file is not UTF-8 (byte {exc.start}).",
            param="input_file_id",
            code="invalid_file",
        ) from None
    found: list[InputLine] = []
    problems: list[dict[str, Any]] = []
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        line, problem = _check(number, raw, endpoint)
        if line is not None and line.custom_id in first_seen:
            problem = f"custom_id {line.custom_id!r} is already used by line {first_seen[line.custom_id]}."
        if problem is not None:
            problems.append({"line": number, "message": f"Line {number}: {problem}"})
            continue
        assert line is not None
        first_seen[line.custom_id] = number
        found.append(line)
    if problems:
        raise APIError(
            400,
            problems[0]["message"]
            + (f" ({len(problems) - 1} more line(s) have problems.)" if len(problems) > 1 else ""),
            param="input_file_id",
            code="invalid_batch_line",
            details=[
                {"param": f"line {p['line']}", "message": p["message"]} for p in problems[:MAX_REPORTED]
            ],
        )
    if not found:
        raise APIError(400, "The input file has no request lines.", param="input_file_id", code="empty_file")
    if len(found) > max_lines:
        raise APIError(
            400,
            f"The input file has {len(found)} requests; a batch takes at most {max_lines} (BATCH_MAX_LINES).",
            param="input_file_id",
            code="too_many_lines",
        )
    return found
