"""One tier shared by successive TieredStores (one per engine run, per batch of requests):
a closed or dropped store lets go of the tier's event bus."""

from __future__ import annotations

import gc
import weakref

from prefixkv.paged.events import EventLog
from prefixkv.paged.tiers import DiskTier, HostTier, TieredStore
from tier_helpers import keys as _keys
from tier_helpers import rows as _rows


def test_closed_stores_unsubscribe_from_a_shared_tier(tmp_path):
    # the stores subscribed their buses to each tier and never unsubscribed: after 5000
    # stores a shared disk tier fed 5000 buses (3.8 ms an event), and each one's listeners
    disk = DiskTier(str(tmp_path))
    logs = []
    for i in range(4):
        store = TieredStore([HostTier(1 << 16), disk])
        log = EventLog()
        store.events.subscribe(log)
        logs.append(log)
        assert store.batch_put(_keys(1, start=i), _rows(1, seed=i)) == [True]
        store.close()
    assert len(disk.events) == 0
    seen = [len(log.events) for log in logs]
    disk.batch_remove(_keys(4))  # the shared tier's events reach no closed store
    assert [len(log.events) for log in logs] == seen


def test_a_dropped_store_unsubscribes_and_is_collected(tmp_path):
    disk = DiskTier(str(tmp_path))
    host = HostTier(1 << 16)
    store = TieredStore([host, disk])
    log = EventLog()
    store.events.subscribe(log)
    store.batch_put(_keys(2), _rows(2))
    assert len(disk.events) == 1 and len(host.events) == 1
    n = len(log.events)
    assert n >= 2  # an open store forwards its tiers' events
    ref = weakref.ref(store)
    del store
    gc.collect()
    assert ref() is None
    assert len(disk.events) == 0 and len(host.events) == 0
    disk.batch_remove(_keys(2))
    assert len(log.events) == n


def test_close_twice_and_events_until_close(tmp_path):
    disk = DiskTier(str(tmp_path))
    store = TieredStore([disk])
    log = EventLog()
    store.events.subscribe(log)
    store.batch_put(_keys(1), _rows(1))
    store.batch_remove(_keys(1))
    kinds = [e.kind for e in log.events]
    assert kinds[-1] == "removed"
    store.close()
    store.close()
    assert len(disk.events) == 0
