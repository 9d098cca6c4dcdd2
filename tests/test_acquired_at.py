"""Acquisition time: from STAC items or raster tags into the table's ``acquired_at`` column."""
from __future__ import annotations

import datetime as dt

import pystac

from pipeline.io.stac import choose

UTC = dt.timezone.utc


def _item(item_id: str, when, props: dict | None = None) -> pystac.Item:
    """An item with one asset; ``when=None`` without props: an item that carries no time at all
    (pystac refuses to build one, a catalog read from JSON can hold one)."""
    placeholder = when or (None if props else dt.datetime(2000, 1, 1, tzinfo=UTC))
    item = pystac.Item(id=item_id, geometry=None, bbox=None, datetime=placeholder, properties=props or {})
    item.datetime = when
    item.add_asset("visual", pystac.Asset(href=f"/data/{item_id}.tif"))
    return item


def test_stac_selection_carries_each_items_acquisition_time():
    # datetime wins; an interval item gives its start; an item without any time gives None.
    items = [
        _item("b-instant", dt.datetime(2026, 1, 3, 10, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))),
        _item("a-span", None, {"start_datetime": "2026-01-02T00:00:00Z", "end_datetime": "2026-01-04T00:00:00Z"}),
        _item("c-untimed", None),
    ]
    sel = choose(items, "/cat.json", "visual", (None, None), None)
    got = dict(zip(sel.item_ids, sel.acquired_at))
    assert len(sel.acquired_at) == len(sel.paths) == 3
    assert got["b-instant"] == dt.datetime(2026, 1, 3, 8, 30, tzinfo=UTC)  # 10:30+02:00 in UTC
    assert got["b-instant"].utcoffset() == dt.timedelta(0)
    assert got["a-span"] == dt.datetime(2026, 1, 2, tzinfo=UTC)
    assert got["c-untimed"] is None
