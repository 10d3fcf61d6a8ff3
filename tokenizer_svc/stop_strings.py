"""Stop strings on streamed text: found even when they span tokens, and never streamed out.

Text arrives in pieces (one detokenized delta per step). A stop string can begin in one piece
and end in a later one, so the matcher keeps the last `longest - 1` characters as a search
window, and, unless the stop string is to stay in the output, holds back that many characters
from the stream: they could be the start of a stop string that the next piece completes.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: list[str], include_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include_in_output = include_in_output
        self._window_len = max((len(s) for s in self.stop), default=1) - 1
        # Text never needs taking back when the stop string stays in the output.
        self._hold = 0 if include_in_output else self._window_len
        self._window = ""  # the last `_window_len` characters fed
        self._pending = 0  # how many of the window's last characters are not released yet

    def feed(self, text: str, final: bool = False, check: bool = True) -> tuple[str, str | None]:
        """Add the next piece; return the text that may be released now, and the stop string hit.

        On a hit the released text ends where the stop string begins (or ends, with
        `include_in_output`) and the request is over. `final` releases everything held back;
        `check=False` (before `min_tokens`) holds back as usual but matches nothing.
        """
        full = self._window + text
        start = len(self._window) - self._pending  # where the unreleased text begins in `full`
        if check:
            hit = self._earliest_match(full, len(self._window))
            if hit is not None:
                at, stop = hit
                end = at + len(stop) if self.include_in_output else at
                self._window, self._pending = "", 0
                return full[start:end], stop
        release_end = len(full) if final else max(start, len(full) - self._hold)
        self._pending = len(full) - release_end
        self._window = full[-self._window_len :] if self._window_len else ""
        return full[start:release_end], None

    def _earliest_match(self, full: str, new_from: int) -> tuple[int, str] | None:
        """The first stop string in `full` that ends in its new part (from `new_from` on)."""
        best: tuple[int, str] | None = None
        for stop in self.stop:
            at = full.find(stop, max(0, new_from - len(stop) + 1))
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        return best
