"""The values of a job's STAC filter (``inputs.stac``: ``datetime``, ``bbox``, ``intersects``)
parsed and checked without the network: the job model (pipeline.config.spec) checks them
as a job loads, and pipeline.io.stac applies them to items (see its module doc for how an
item's time and footprint are matched).

Each raises ValueError naming the offending value; the job model reports it under the field.
"""
from __future__ import annotations

import datetime as dt
import json
from typing import Any, Optional, Sequence

_OPEN = ("", "..")

Interval = tuple[Optional[dt.datetime], Optional[dt.datetime]]  # a filter: None ends are open


# ---------------------------------------------------------------- time


def parse_instant(text: str) -> dt.datetime:
    """ISO 8601 date or date-time -> aware UTC datetime (date-only: 00:00 UTC; naive: UTC).

    Raises ValueError with the offending text.
    """
    value = text.strip()
    try:
        parsed = dt.datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise ValueError(f"not an ISO 8601 date or date-time: {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.astimezone(dt.timezone.utc)


def parse_interval(text: str) -> Interval:
    """``"A/B"``, ``"A/.."``, ``"../B"``, ``"A/"``, ``"/B"`` or ``"A"`` -> (start, end),
    None for an open side; a single instant gives (A, A). Raises ValueError."""
    if "/" not in text:
        instant = parse_instant(text)
        return instant, instant
    if text.count("/") != 1:
        raise ValueError(f"expected START/END, got {text!r}")
    left, right = (part.strip() for part in text.split("/"))
    start = None if left in _OPEN else parse_instant(left)
    end = None if right in _OPEN else parse_instant(right)
    if start is None and end is None:
        raise ValueError(f"both ends are open in {text!r}; leave datetime out to take every time")
    if start is not None and end is not None and start > end:
        raise ValueError(f"start {left} is after end {right}")
    return start, end


# ---------------------------------------------------------------- space


def check_bbox(bbox: Sequence[float]) -> list[float]:
    """Validate a lon/lat filter box; return it as floats. Raises ValueError."""
    if len(bbox) != 4:
        raise ValueError(f"must be [minx, miny, maxx, maxy], got {len(bbox)} numbers")
    minx, miny, maxx, maxy = (float(v) for v in bbox)
    if not all(-180.0 <= x <= 180.0 for x in (minx, maxx)):
        raise ValueError(f"longitudes must lie in -180..180 (EPSG:4326), got {minx}, {maxx}")
    if not all(-90.0 <= y <= 90.0 for y in (miny, maxy)):
        raise ValueError(f"latitudes must lie in -90..90 (EPSG:4326), got {miny}, {maxy}")
    if miny > maxy:
        raise ValueError(f"miny ({miny}) is above maxy ({maxy})")
    return [minx, miny, maxx, maxy]


def read_geometry(value: Any) -> dict:
    """``intersects`` of a job: a GeoJSON file name, or a geometry, Feature or FeatureCollection
    (as a dict) -> one GeoJSON geometry (the union of a collection's features), lon/lat.

    Raises ValueError naming the file and what is wrong (unreadable, not GeoJSON, not lon/lat).
    """
    import shapely
    from shapely.geometry import mapping, shape

    where = ""
    if isinstance(value, str):
        where = f"{value}: "
        try:
            with open(value, encoding="utf-8") as f:
                value = json.load(f)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {where}{err}") from None
    kind = value.get("type") if isinstance(value, dict) else None
    try:
        if kind == "FeatureCollection":
            geometry = shapely.union_all([shape(f["geometry"]) for f in value["features"]])
        elif kind == "Feature":
            geometry = shape(value["geometry"])
        else:
            geometry = shape(value)
    except (KeyError, TypeError, ValueError, AttributeError, shapely.errors.GeometryTypeError) as err:
        raise ValueError(f"{where}not a GeoJSON geometry, Feature or FeatureCollection: {err}") from None
    if geometry.is_empty:
        raise ValueError(f"{where}the geometry is empty")
    minx, miny, maxx, maxy = geometry.bounds
    try:
        check_bbox([minx, miny, maxx, maxy])
    except ValueError as err:
        raise ValueError(f"{where}{err}") from None
    return dict(mapping(geometry))
