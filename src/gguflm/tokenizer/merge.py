"""The merge loop shared by SPM and BPE: llama.cpp's work queues of symbol pairs."""

from __future__ import annotations

import heapq


def merge(syms: list[str], priority: dict[str, float], sep: str) -> list[str]:
    """Repeatedly join the adjacent pair (a, b) of lowest ``priority[a + sep + b]`` (pairs
    not in the table never join), the leftmost among equals; return the symbols left.
    SPM: keys are token texts, priority minus the token's score; BPE: keys are the merge
    rules "a b", priority their rank -- llama.cpp's two work queues.

    A queue entry (priority, left, length) is stale once either symbol has changed; the
    combined length tells, since symbols only ever grow."""
    n = len(syms)
    get = priority.get
    heap: list[tuple[float, int, int]] = []
    for i in range(n - 1):
        p = get(syms[i] + sep + syms[i + 1])
        if p is not None:
            heap.append((p, i, len(syms[i]) + len(syms[i + 1])))
    if not heap:
        return syms
    heapq.heapify(heap)
    nxt = list(range(1, n + 1))             # (n,) index of the next live symbol, -1 at the end
    nxt[-1] = -1
    prv = list(range(-1, n - 1))            # (n,) index of the previous live symbol
    while heap:
        _, left, size = heapq.heappop(heap)
        right = nxt[left]
        if right < 0:
            continue
        a, b = syms[left], syms[right]
        if not a or len(a) + len(b) != size:
            continue
        joined = syms[left] = a + b
        syms[right] = ""
        after = nxt[left] = nxt[right]
        if after >= 0:
            prv[after] = left
            p = get(joined + sep + syms[after])
            if p is not None:
                heapq.heappush(heap, (p, left, len(joined) + len(syms[after])))
        before = prv[left]
        if before >= 0:
            p = get(syms[before] + sep + joined)
            if p is not None:
                heapq.heappush(heap, (p, before, len(syms[before]) + len(joined)))
    return [s for s in syms if s]
