"""A job's event stream: events published from a worker thread reach an asyncio subscriber in order, a late
subscriber gets the history, ``after`` resumes, and the stream ends with the last event."""

from __future__ import annotations

import asyncio
import threading

from service.jobs.events import JobEvent, JobEvents


def test_events_from_a_thread_reach_subscribers_in_order_and_end_with_the_last() -> None:
    async def main() -> tuple[list[JobEvent | None], list[JobEvent | None], list[JobEvent | None]]:
        events = JobEvents(asyncio.get_running_loop())
        early = asyncio.create_task(collect(events, 0))
        await asyncio.sleep(0.01)

        def work() -> None:
            for i in range(5):
                events.publish("progress", f'{{"i": {i}}}')
            events.publish("job", '{"done": true}', last=True)
            events.publish("progress", "ignored after the end")

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        return await early, await collect(events, 0), await collect(events, 4)

    async def collect(events: JobEvents, after: int) -> list[JobEvent | None]:
        return [e async for e in events.stream(after, keepalive_s=5.0)]

    early, late, resumed = asyncio.run(asyncio.wait_for(main(), 10))
    assert [e.seq for e in early if e] == [1, 2, 3, 4, 5, 6] and early == late
    assert [e.kind for e in early if e] == ["progress"] * 5 + ["job"]
    assert [e.seq for e in resumed if e] == [5, 6]


def test_a_quiet_stream_yields_keepalives() -> None:
    async def main() -> list[JobEvent | None]:
        events = JobEvents(asyncio.get_running_loop())
        seen: list[JobEvent | None] = []
        async for event in events.stream(0, keepalive_s=0.01):
            seen.append(event)
            if len(seen) == 2:
                events.publish("job", "{}", last=True)
        return seen

    seen = asyncio.run(asyncio.wait_for(main(), 10))
    assert seen[:2] == [None, None] and seen[-1] is not None and seen[-1].kind == "job"
