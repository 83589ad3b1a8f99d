"""Token counts as users type them on a command line: ``1024,2048,4K`` (K = 1,024 tokens)."""

from __future__ import annotations

from .errors import KvSurgeonError


def parse_token_counts(text: str, flag: str) -> tuple[int, ...]:
    """Comma-separated positive whole token counts, a K suffix meaning x1,024 (``1.5K`` = 1,536). Anything
    else, a fraction of a token, zero or a negative count included, raises KvSurgeonError naming ``flag``
    and the form it takes."""
    counts = []
    for v in (v.strip() for v in text.split(",")):
        if not v:
            continue
        try:
            n = float(v[:-1]) * 1024 if v[-1] in "kK" else int(v)
            whole = n == int(n) and n > 0
        except (ValueError, OverflowError):  # not a number; inf or nan with a K
            whole = False
        if not whole:
            raise KvSurgeonError(f"{flag} {text!r}: use comma-separated whole token counts, each above 0, e.g. 1024,2048,4K")
        counts.append(int(n))
    return tuple(counts)
