"""AlarmFeed: alarm events as they commit, for AlarmService.Watch streams.

LISTEN ``rmiot_alarm_events`` (the migration's trigger sends the newest id);
on each notification the events after the feed's cursor are read once and
handed to every subscriber's queue. A Watch stream subscribes first, then
replays from the database what came after its client's cursor, then takes
its queue, skipping ids it already sent: event ids follow commit order
(``alarm_store.locked``), so nothing falls between the replay and the live
part. A subscriber that falls ``QUEUE_MAX`` events behind is cut off
(``overflowed``): its client resumes from its cursor.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from rmiot.db import ChangeFollower
from rmiot.ingest import alarm_store
from rmiot.ingest.alarm_store import Event
from rmiot.ingest.alarm_writer import EVENTS_CHANNEL

QUEUE_MAX = 10_000


class Subscription:
    __slots__ = ("overflowed", "queue")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.overflowed = False

    def put(self, event: Event) -> None:
        if self.overflowed:
            return
        if self.queue.qsize() >= QUEUE_MAX:
            self.overflowed = True
            self.queue.put_nowait(None)  # wakes the stream to end it
            return
        self.queue.put_nowait(event)


class AlarmFeed(ChangeFollower):
    channels = (EVENTS_CHANNEL,)
    name = "alarm feed"

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.cursor = 0
        self.subscribers: set[Subscription] = set()

    def subscribe(self) -> Subscription:
        sub = Subscription()
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)

    async def load_all(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not self.cursor:
            self.cursor = await alarm_store.last_event_id(conn)
        else:  # reconnected: what committed meanwhile goes out now
            await self.apply(conn, [])

    async def apply(self, conn: psycopg.AsyncConnection[Any],
                    notes: list[psycopg.Notify]) -> None:
        while True:
            events = await alarm_store.events_after(conn, self.cursor)
            for event in events:
                for sub in list(self.subscribers):
                    sub.put(event)
                self.cursor = event.id
            if len(events) < 1000:
                return
