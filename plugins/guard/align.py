"""Where a text derived by deleting a few characters lines up with the text it came from.

The scanner matches the rules against forms of a prompt that differ from its light form in a few
places (the words spelt out letter by letter, joined): :func:`shared_runs` finds the stretches
the two have in common, so that ``RuleSet.fired_edited`` sweeps only around the differences and
takes the rest of the prefix occurrences from the light form's sweep. Comparisons are slices
(C speed), a few dozen per difference, never a Python step per character.
"""

from __future__ import annotations

#: Most characters a text may lack against the one it is aligned with: beyond that, aligning
#: costs more than it saves (the caller sweeps the whole text instead).
MAX_DELETIONS = 64
#: First slice length compared when looking for the next difference (then doubled).
_STEP = 64


def common_length(a: str, i: int, b: str, j: int) -> int:
    """Length of the common prefix of ``a[i:]`` and ``b[j:]``: slices of doubling length are
    compared until two differ, then the difference is found by bisection."""
    n = min(len(a) - i, len(b) - j)
    lo, step = 0, _STEP
    while True:
        hi = min(n, lo + step)
        if a[i + lo : i + hi] != b[j + lo : j + hi]:
            break
        if hi == n:
            return n
        lo, step = hi, step * 2
    # a[i : i + lo] == b[j : j + lo], and the next hi - lo characters differ somewhere.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[i + lo : i + mid] == b[j + lo : j + mid]:
            lo = mid
        else:
            hi = mid
    return lo


def shared_runs(
    base: str, text: str, most: int = MAX_DELETIONS
) -> list[tuple[int, int, int]] | None:
    """When ``text`` is ``base`` with at most ``most`` characters deleted: the stretches they
    share, as ``(start in base, start in text, length)``, in order; None otherwise.

    Greedy: at each difference the character of ``base`` is taken as deleted. If ``text`` is
    ``base`` less some characters, this lines every character of ``text`` up with an equal one
    of ``base`` (perhaps not the one that was kept, when two neighbours are equal: the stretches
    are shared all the same)."""
    nb, nt = len(base), len(text)
    if not 0 <= nb - nt <= most:
        return None
    runs: list[tuple[int, int, int]] = []
    i = j = 0
    while True:
        k = common_length(base, i, text, j)
        if k:
            runs.append((i, j, k))
        i += k
        j += k
        if j == nt:
            return runs  # (what is left of base, if anything, was deleted)
        if i - j == nb - nt:
            return None  # no deletion left to explain the difference
        i += 1
