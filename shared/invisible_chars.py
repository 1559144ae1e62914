"""Invisible formatting characters: bidi overrides and isolates, zero-width characters
and every other Unicode "format" (Cf) character.

Shown in a job name, a tag or a file name they disguise what a reader sees: U+202E
turns `report_exe.csv` into something that reads as another file, a zero-width space
makes two names that look equal differ. Names and tags that carry one are refused
(shared/spec.py); an uploaded file's name is stored without them (server/uploads_api.py).
Pure stdlib: the web process and the CLI both import this.
"""

from __future__ import annotations

import unicodedata


def is_invisible(char: str) -> bool:
    """Category Cf covers U+061C, U+200B-U+200F, U+202A-U+202E, U+2060-U+2064,
    U+2066-U+2069, U+FEFF and the rest of the format characters."""
    return unicodedata.category(char) == "Cf"


def describe(char: str) -> str:
    """`U+202E (RIGHT-TO-LEFT OVERRIDE)`: the character named, never shown itself."""
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" ({name})" if name else "")


def first_invisible(text: str) -> str | None:
    """The first invisible formatting character in `text`, described; None if none."""
    for char in text:
        if is_invisible(char):
            return describe(char)
    return None


def strip_invisible(text: str) -> str:
    """`text` without its invisible formatting characters."""
    return "".join(char for char in text if not is_invisible(char))
