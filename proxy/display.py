"""Text shown to people: what others chose, made safe to print (in a terminal and in a spreadsheet), and a
rejected value's validation errors said in one line.

End users pick their user ids and feature tags, upstreams and Anthropic's Admin API name models and explain
errors. Printed raw, an escape sequence in one of them would act on the operator's terminal (clear it, move the
cursor to rewrite a line, set the clipboard with OSC 52), and a cell starting with `=` would run as a formula in a
spreadsheet. Every table, CSV and error line the CLI prints goes through `visible`; CSV cells through `csv_row`.
JSON needs neither: `json.dumps` escapes every control character itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Only for the annotation: `spendgate --help` imports this module and must not load pydantic.
    from pydantic import ValidationError

# Written the way `repr` writes them: C0 (tab and newline too, so that a value stays on its line and in its column),
# DEL, C1 (`\x9b` is CSI to terminals that read 8-bit controls), the bidi embeddings, overrides, isolates and marks
# that reorder what is shown around them ("Trojan Source", CVE-2021-42574), and the Unicode line and paragraph
# separators. The backslash is doubled so that an escape shown always stands for the character, never for text a
# client typed to look like one.
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES |= {ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r", ord("\\"): "\\\\"}
_ESCAPES |= {
    code: f"\\u{code:04x}"
    for code in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
}
# OWASP's CSV-injection starts (tab and carriage return, its other two, are escaped by `visible` already).
_FORMULA_STARTS = ("=", "+", "-", "@")
# Our own numbers as text (money, deltas): a leading minus there is a sign, not a formula.
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def visible(text: str) -> str:
    """`text` with every control character shown as its escape (ESC as the four characters `\\x1b`, as `repr`
    writes it) and each backslash doubled: it prints on one line, moves no cursor, and reads back exactly."""
    return text.translate(_ESCAPES)


def csv_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row for `csv.DictWriter`: text made `visible`, with a leading `'` where a spreadsheet would run it as a
    formula (OWASP's advice for CSV injection); numbers, booleans and None as they are."""
    return {name: _cell(value) for name, value in row.items()}


def _cell(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    shown = visible(value)
    if shown.startswith(_FORMULA_STARTS) and not _NUMBER.fullmatch(shown):
        return "'" + shown
    return shown


def explain(error: ValidationError) -> str:
    """A validation failure as one readable sentence naming each field."""
    problems = []
    for problem in error.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            problems.append(f"unknown field '{where}'")
        elif problem["type"] == "missing":
            problems.append(f"'{where}' is required")
        else:
            problems.append(f"'{where}': {problem['msg']}" if where else problem["msg"])
    return "; ".join(problems)
