"""The scheduler-to-event-loop glue: events cross threads through the loop's mailbox in
order, and pieces that wait together reach the stream as one (no text lost or reordered)."""

from __future__ import annotations

import asyncio
import threading

from gguflm.engine.scheduler import Done, Piece, TokenLogprob
from gguflm.server.backend import Generation


def test_waiting_pieces_come_as_one_in_order(fake_scheduler) -> None:
    async def main() -> list:
        sched = fake_scheduler
        gen = Generation(sched, job=None)
        lp = [TokenLogprob(i, -0.5 * i) for i in range(4)]
        worker = threading.Thread(target=lambda: [sched.emit(Piece(t, (l,))) for t, l in zip("abc", lp)]
                                  + [sched.emit(Done("length", 3, 3))])
        worker.start()
        worker.join()                        # all four events wait before the loop looks
        return [ev async for ev in gen.events()]

    events = asyncio.run(main())
    assert events[0] == Piece("abc", tuple(TokenLogprob(i, -0.5 * i) for i in range(3)))
    assert events[1:] == [Done("length", 3, 3)]


def test_pieces_taken_one_by_one_stay_apart(fake_scheduler) -> None:
    async def main() -> list:
        sched = fake_scheduler
        gen = Generation(sched, job=None)
        out = []
        events = gen.events()
        for text in "xyz":
            threading.Thread(target=sched.emit, args=(Piece(text),)).start()
            out.append(await events.__anext__())
        threading.Thread(target=sched.emit, args=(Done("stop", 1, 3),)).start()
        out.append(await events.__anext__())
        return out

    assert asyncio.run(main()) == [Piece("x"), Piece("y"), Piece("z"), Done("stop", 1, 3)]
