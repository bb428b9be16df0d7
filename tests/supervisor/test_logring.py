"""The in-memory log ring behind `ssh device logs`: bounds, tail, follow, and the output pump."""

from __future__ import annotations

import logging
import threading

import anyio
import pytest

from sshfwup.supervisor.logring import LogLine, LogRing, pump_lines


def texts(lines: list[LogLine]) -> list[str]:
    return [line.text for line in lines]


def test_bounded_by_line_count() -> None:
    ring = LogRing(max_lines=5, max_bytes=10_000)
    for i in range(12):
        ring.append(f"line {i}")
    assert texts(ring.tail()) == [f"line {i}" for i in range(7, 12)]
    assert ring.size == (5, sum(len(f"line {i}") for i in range(7, 12)))
    assert ring.last_seq == 12


def test_bounded_by_bytes() -> None:
    ring = LogRing(max_lines=1000, max_bytes=100)
    for i in range(50):
        ring.append(f"{i:02d}" + "x" * 18)  # 20 characters each
    lines, size = ring.size
    assert size <= 100 and lines == 5
    assert texts(ring.tail(1)) == ["49" + "x" * 18]


def test_a_long_line_is_cut_and_marked() -> None:
    ring = LogRing(max_lines=10, max_bytes=10_000, max_line=50)
    ring.append("y" * 10_000)
    (line,) = ring.tail()
    assert len(line.text) == 50 and line.text.endswith("[…cut]")


def test_tail_sizes() -> None:
    ring = LogRing()
    for i in range(3):
        ring.append(str(i))
    assert texts(ring.tail(2)) == ["1", "2"]
    assert ring.tail(0) == []
    assert texts(ring.tail(10)) == ["0", "1", "2"]


def test_since_counts_what_a_slow_reader_missed() -> None:
    ring = LogRing(max_lines=3)
    for i in range(10):
        ring.append(str(i))
    missed, lines = ring.since(2)  # it had read up to seq 2 ("1"); 3..7 are gone
    assert missed == 5 and texts(lines) == ["7", "8", "9"]
    assert ring.since(10) == (0, [])


def test_it_is_a_logging_handler_with_app_fields() -> None:
    ring = LogRing()
    logger = logging.getLogger("test_logring.handler")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(ring)
    try:
        logger.info("hello %s", "world")
        logging.getLogger("app").addHandler(ring)
        logging.getLogger("app").warning("from the app", extra={"app_version": "2.0.0", "app_pid": 42})
    finally:
        logger.removeHandler(ring)
        logging.getLogger("app").removeHandler(ring)
    first, second = texts(ring.tail())
    assert first.endswith(" INFO test_logring.handler: hello world")
    assert second.endswith(" WARNING app 2.0.0[42]: from the app")


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        LogRing(max_lines=0)


async def test_follow_gets_new_lines_also_from_other_threads() -> None:
    ring = LogRing()
    ring.append("old")
    got: list[str] = []

    async def follow() -> None:
        async for item in ring.follow(ring.last_seq):
            assert isinstance(item, LogLine)
            got.append(item.text)
            if len(got) == 3:
                return

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await anyio.sleep(0.05)
            ring.append("from the loop")
            await anyio.to_thread.run_sync(ring.append, "from a worker thread")
            thread = threading.Thread(target=ring.append, args=("from a plain thread",))
            thread.start()
            thread.join()
    assert got == ["from the loop", "from a worker thread", "from a plain thread"]


async def test_follow_reports_lines_it_fell_behind_on() -> None:
    ring = LogRing(max_lines=2)
    start = ring.last_seq
    for i in range(5):
        ring.append(str(i))
    items = []
    with anyio.fail_after(5):
        async for item in ring.follow(start):
            items.append(item)
            if len(items) == 3:
                break
    assert items[0] == 3  # "0", "1", "2" were dropped before it read
    assert [i.text for i in items[1:]] == ["3", "4"]  # type: ignore[union-attr]


class _Chunks:
    """A byte stream delivering the given chunks (what a process pipe does)."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)


async def test_pump_splits_lines_across_chunks_and_keeps_the_last_one() -> None:
    lines: list[str] = []
    await pump_lines(_Chunks(b"one\ntw", b"o\r\n\nthr", b"ee"), lines.append)  # type: ignore[arg-type]
    assert lines == ["one", "two", "three"]


async def test_pump_cuts_a_line_without_end() -> None:
    lines: list[str] = []
    await pump_lines(_Chunks(b"a" * 300, b"b" * 300, b"c\nnext\n"), lines.append, max_line=100)  # type: ignore[arg-type]
    assert len(lines) == 2
    assert lines[0].startswith("a" * 100) and lines[0].endswith("[…cut]")
    assert lines[1] == "next"


async def test_pump_decodes_bad_utf8_without_failing() -> None:
    lines: list[str] = []
    await pump_lines(_Chunks(b"caf\xe9\n"), lines.append)  # type: ignore[arg-type]
    assert lines == ["caf\ufffd"]
