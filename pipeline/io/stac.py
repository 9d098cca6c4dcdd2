"""STAC input: scene paths from a static STAC catalog, collection or ItemCollection, or a STAC API search.

``inputs.stac`` in a job (see :class:`pipeline.config.spec.StacSpec`) names a source — a local
JSON file or an http(s) URL holding a Catalog, a Collection (their items are found
through child/item links, recursively), an ItemCollection (``FeatureCollection``) or a
single Item — and the asset key whose file each item contributes as a scene.

Filters, both optional, both inclusive:

- time: ``"2026-01-01/2026-02-01"``, open-ended ``"2026-01-01/.."`` or ``"../2026-02-01"``
  (an empty side means open too), or one instant. Date-only values mean midnight UTC at
  the start of that day; values without a zone are UTC. An item's time is its
  ``datetime``, or its ``start_datetime``..``end_datetime`` interval; it matches when that
  touches the filter interval. Items without any time never match a time filter.
- space: ``[minx, miny, maxx, maxy]`` in EPSG:4326 (lon/lat); minx > maxx crosses the
  antimeridian. An item matches when its geometry (else its bbox) intersects it.

``since_last_success``: the lower time bound becomes the newest item time of the last
successful run (the run reads it from the table's run reports,
:func:`pipeline.run.runbook.last_success_datetime`, and hands it to :func:`select_stac`
as ``since``), if later than the configured start. The bound is inclusive, so items at
exactly that time are offered again; the incremental skip of already-committed scenes
makes that free, and it never loses an item that shares the last run's newest timestamp.
Items added to a catalog later with an *older* time are not picked up by this rule (use a
fixed ``datetime`` range or ``--force`` for backfills).

A STAC API (``source`` is an API landing page: a Catalog that lists ``conformsTo``) is
searched with pystac-client (conformance checks, paging, GET/POST): ``collections`` (required),
``bbox`` or ``intersects``, ``datetime`` (with the ``since_last_success`` bound), a CQL2-JSON
``filter`` (where the API conforms to Filter), ``max_items`` and ``page_size`` go to the API,
and its items pass through the same :func:`choose` as a catalog's. ``sign:
planetary-computer`` signs asset hrefs through pystac-client's ``modifier`` (the ``pc`` extra).

Hrefs are returned absolute: relative asset hrefs are resolved against the item's own
location (or the source's, for ItemCollections), ``file://`` URIs become local paths.
A STAC scene's id is its item id, so items whose assets share a file name (every
Sentinel-2 item holds a ``TCI.tif``) are distinct scenes; two selected items with the same
id are refused before anything runs (:func:`pipeline.io.inputs.require_scenes`).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from pipeline.config.stac_filters import Interval, check_bbox, parse_instant, parse_interval
from pipeline.errors import ConfigError, InputError

ItemInterval = tuple[dt.datetime, dt.datetime]  # an item's time: both ends known


# ---------------------------------------------------------------- time


def item_interval(item: Any) -> Optional[ItemInterval]:
    """(start, end) of a pystac Item in UTC, or None when it carries no time at all."""
    if item.datetime is not None:
        when = _utc(item.datetime)
        return when, when
    meta = item.common_metadata
    start, end = meta.start_datetime, meta.end_datetime
    if start is None and end is None:
        return None
    start, end = _utc(start or end), _utc(end or start)
    return start, end


def _utc(value: dt.datetime) -> dt.datetime:
    return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)


def overlaps(item: ItemInterval, window: Interval) -> bool:
    """True when the closed intervals touch; None ends of ``window`` are open."""
    start, end = window
    return (start is None or item[1] >= start) and (end is None or item[0] <= end)


def lower_bound(window: Interval, since: Optional[dt.datetime]) -> Interval:
    """``window`` with its start raised to ``since`` when that is later."""
    start, end = window
    if since is not None and (start is None or since > start):
        start = since
    return start, end


# ---------------------------------------------------------------- space


def _boxes(bbox: Sequence[float]) -> list:
    """[minx, miny, maxx, maxy] (or the 3-D [minx, miny, minz, maxx, maxy, maxz]) ->
    shapely boxes; two when it crosses the antimeridian (minx > maxx)."""
    import shapely

    values = [float(v) for v in bbox]
    if len(values) == 6:
        values = [values[0], values[1], values[3], values[4]]
    minx, miny, maxx, maxy = values
    if minx <= maxx:
        return [shapely.box(minx, miny, maxx, maxy)]
    return [shapely.box(minx, miny, 180.0, maxy), shapely.box(-180.0, miny, maxx, maxy)]


def item_in_geometry(item: Any, geometry: dict) -> bool:
    """True when the item's geometry (else its bbox) intersects the lon/lat GeoJSON ``geometry``."""
    from shapely.geometry import shape

    if item.geometry is not None:
        return bool(shape(item.geometry).intersects(shape(geometry)))
    return item.bbox is not None and any(b.intersects(shape(geometry)) for b in _boxes(item.bbox))


def item_intersects(item: Any, bbox: Sequence[float]) -> bool:
    """True when the item's geometry (else its bbox) intersects the lon/lat ``bbox``."""
    import shapely
    from shapely.geometry import shape

    wanted = _boxes(bbox)
    if item.geometry is not None:
        footprint = [shape(item.geometry)]
    elif item.bbox is not None:
        footprint = _boxes(item.bbox)
    else:
        return False
    return any(shapely.intersects(a, b) for a in wanted for b in footprint)


# ---------------------------------------------------------------- reading


def _is_url(text: str) -> bool:
    return urllib.parse.urlparse(text).scheme in ("http", "https")


def _local(text: str) -> str:
    """``file://`` URI -> local path; other text unchanged."""
    if text.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(text).path)
    return text


def _api_message(err: Exception) -> str:
    """The server's own words from a pystac-client APIError (its JSON ``description``/``detail``),
    after the HTTP status when there was a response."""
    text = str(err)
    status = getattr(err, "status_code", None)
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        text = str(body.get("description") or body.get("detail") or body.get("message") or text)
    return f"HTTP {status}: {text}" if status else text


def read_json(source: str) -> tuple[str, Any]:
    """(absolute location, parsed JSON) of a STAC source: a local path or an http(s) URL.

    Raises InputError naming the source and the cause (not found, unreachable, not JSON).
    """
    import pystac
    from pystac_client.exceptions import APIError
    from pystac_client.stac_api_io import StacApiIO

    where = source if _is_url(source) else os.path.abspath(_local(source))
    if not _is_url(where) and not os.path.isfile(where):
        raise InputError(f"{source}: STAC source not found")
    try:  # pystac-client's reader: every HTTP failure (refused, timed out, 4xx/5xx) is one APIError
        return where, (StacApiIO() if _is_url(where) else pystac.StacIO.default()).read_json(where)
    except APIError as err:
        raise InputError(f"{source}: cannot read STAC JSON: {_api_message(err)}") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{source}: cannot read STAC JSON: {err}") from None


def read_items(source: str) -> list:
    """Every Item of a Catalog, Collection (recursively), ItemCollection or single Item.

    ``source``: local JSON path or http(s) URL. Raises InputError naming the source.
    """
    return items_of(*read_json(source), source)


def items_of(where: str, data: Any, source: str) -> list:
    """The Items of a static source's parsed JSON ``data`` read from ``where`` (see :func:`read_items`)."""
    import pystac

    kind = data.get("type") if isinstance(data, dict) else None
    try:
        if kind == "FeatureCollection":
            return list(pystac.ItemCollection.from_dict(data, preserve_dict=False))
        obj = pystac.read_dict(data, href=where)
        if isinstance(obj, pystac.Item):
            return [obj]
        if isinstance(obj, pystac.Catalog):  # Collection is a Catalog
            return list(obj.get_items(recursive=True))
    except (pystac.STACError, pystac.STACTypeError, pystac.RequiredPropertyMissing, pystac.DuplicateObjectKeyError,
            KeyError, TypeError, ValueError, OSError) as err:
        raise InputError(f"{source}: not a readable STAC catalog, collection or item collection: {err}") from None
    raise InputError(f"{source}: expected a STAC Catalog, Collection, ItemCollection or Item, got type {kind!r}")


def asset_href(item: Any, asset: str, source: str) -> Optional[str]:
    """Absolute href of ``item``'s ``asset`` (None if the item lacks it).

    Relative hrefs resolve against the item's self link, else against ``source``.
    """
    found = item.assets.get(asset)
    if found is None:
        return None
    href = found.get_absolute_href() or found.href
    href = _local(href)
    if _is_url(href) or "://" in href or os.path.isabs(href):
        return href if "://" in href else os.path.normpath(href)
    base = source if _is_url(source) else os.path.abspath(_local(source))
    if _is_url(base):
        return urllib.parse.urljoin(base, href)
    return os.path.normpath(os.path.join(os.path.dirname(base), href))


# ---------------------------------------------------------------- selection


@dataclass
class StacSelection:
    """What a STAC source contributes to a run.

    paths: scene hrefs, sorted by item time then id; item_ids: the item of each path;
    acquired_at: each path's acquisition time (the item's ``datetime``, else its
    ``start_datetime``, else its ``end_datetime``; aware UTC), None for an item without time;
    newest: ISO 8601 UTC of the latest item time selected (None if nothing was), to be
    stored in the run report (:data:`pipeline.run.runbook.REPORT_KEY`); skipped: ``{"item", "reason"}``
    for items that matched the filters but could not be used (no such asset).
    """

    paths: list[str] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)
    acquired_at: list[Optional[dt.datetime]] = field(default_factory=list)
    newest: Optional[str] = None
    skipped: list[dict] = field(default_factory=list)


def choose(items: Sequence[Any], source: str, asset: str, window: Interval,
           bbox: Optional[Sequence[float]]) -> StacSelection:
    """Filter ``items`` by time ``window`` and ``bbox``; collect their ``asset`` hrefs."""
    timed = window != (None, None)
    picked = []
    for item in items:
        when = item_interval(item)
        if timed and (when is None or not overlaps(when, window)):
            continue
        if bbox is not None and not item_intersects(item, bbox):
            continue
        picked.append((when, item))
    far_past = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    picked.sort(key=lambda p: ((p[0] or (far_past, far_past))[0], p[1].id))
    out = StacSelection()
    newest: Optional[dt.datetime] = None
    for when, item in picked:
        href = asset_href(item, asset, source)
        if href is None:
            has = ", ".join(sorted(item.assets))
            out.skipped.append({"item": item.id, "reason": f"no asset {asset!r} (has: {has})"})
            continue
        out.paths.append(href)
        out.item_ids.append(item.id)
        out.acquired_at.append(when[0] if when is not None else None)
        if when is not None and (newest is None or when[1] > newest):
            newest = when[1]
    if picked and not out.paths:
        raise InputError(f"{source}: {len(picked)} items match but none has asset {asset!r}; "
                         f"e.g. item {picked[0][1].id!r} has: {', '.join(sorted(picked[0][1].assets))}")
    out.newest = newest.isoformat() if newest is not None else None
    return out


def stac_scene_paths(source: str, asset: str, datetime_range: Optional[str] = None,
                     bbox: Optional[Sequence[float]] = None, since: Optional[dt.datetime | str] = None) -> list[str]:
    """Absolute hrefs of ``asset`` of the items of ``source`` matching the filters.

    datetime_range: interval text (see :func:`parse_interval`); bbox: lon/lat box;
    since: a lower time bound (datetime or ISO text), inclusive, raising the start of
    ``datetime_range`` when later. Raises ConfigError for a malformed filter,
    InputError for an unreadable source.
    """
    return select_scenes(source, asset, datetime_range, bbox, since).paths


def select_scenes(source: str, asset: str, datetime_range: Optional[str] = None,
                  bbox: Optional[Sequence[float]] = None,
                  since: Optional[dt.datetime | str] = None) -> StacSelection:
    """Like :func:`stac_scene_paths`, returning the whole :class:`StacSelection`."""
    try:
        window = parse_interval(datetime_range) if datetime_range else (None, None)
        box = check_bbox(bbox) if bbox is not None else None
        lower = parse_instant(since) if isinstance(since, str) else (_utc(since) if since else None)
    except ValueError as err:
        raise ConfigError(f"STAC filter: {err}") from None
    return choose(read_items(source), source, asset, lower_bound(window, lower), box)


# ---------------------------------------------------------------- STAC APIs


def is_api_landing_page(data: Any) -> bool:
    """True for a STAC API's landing page: a Catalog that lists ``conformsTo`` classes (a static
    catalog lists none)."""
    return isinstance(data, dict) and data.get("type") == "Catalog" and isinstance(data.get("conformsTo"), list)


def signer(name: Optional[str]) -> Optional[Callable[[Any], Any]]:
    """The function that signs an Item, ItemCollection or Collection in place for
    ``inputs.stac.sign`` (pystac-client's ``modifier``), or None without signing.

    Raises ConfigError when the signer's package is not installed.
    """
    if name is None:
        return None
    try:
        import planetary_computer
    except ImportError:
        raise ConfigError(f"inputs.stac.sign: {name} needs the planetary-computer package: "
                          "pip install 'retinanet-pipeline[pc]'") from None
    return planetary_computer.sign_inplace


def search_api(stac: Any, window: Interval, bbox: Optional[Sequence[float]]) -> list:
    """The Items a STAC API's item search returns for ``stac`` (a StacSpec) in ``window``.

    Through pystac-client: it checks conformance, pages (``page_size`` items a page) and
    picks GET or POST. Raises ConfigError without ``collections``, InputError naming the
    API and the cause when it cannot be reached, does not conform to Item Search (or to
    Filter, for a ``filter``) or refuses the search (the server's message).
    """
    import pystac_client
    from pystac_client import ConformanceClasses
    from pystac_client.errors import ClientTypeError
    from pystac_client.exceptions import APIError

    source = stac.source
    if not stac.collections:
        raise ConfigError(f"inputs.stac.collections: required for a STAC API source ({source}): "
                          "name the collections to search, e.g. [sentinel-2-l2a]")
    try:
        client = pystac_client.Client.open(source, modifier=signer(stac.sign))
    except (APIError, ClientTypeError) as err:
        raise InputError(f"{source}: cannot open the STAC API: {_api_message(err)}") from None
    if not client.conforms_to(ConformanceClasses.ITEM_SEARCH):
        listed = ", ".join(client.to_dict().get("conformsTo", [])) or "nothing"
        raise InputError(f"{source}: does not conform to STAC API - Item Search, so it cannot be searched "
                         f"(conformsTo lists: {listed})")
    if stac.filter is not None and not client.conforms_to(ConformanceClasses.FILTER):
        raise InputError(f"{source}: inputs.stac.filter: the API does not conform to STAC API - Filter")
    start, end = window
    search = client.search(collections=stac.collections, bbox=None if bbox is None else list(bbox),
                           intersects=stac.intersects,
                           datetime=None if window == (None, None) else [start, end], filter=stac.filter,
                           max_items=stac.max_items, limit=stac.page_size)
    try:
        return list(search.items())
    except APIError as err:
        raise InputError(f"{source}: the STAC API refused the search: {_api_message(err)}") from None


def select_stac(stac: Any, since: Optional[dt.datetime] = None) -> StacSelection:
    """The scenes of a job's ``inputs.stac`` section (a :class:`pipeline.config.spec.StacSpec`).

    since: the high-water mark of ``since_last_success`` (the run reads it from the table,
    :func:`pipeline.run.runbook.last_success_datetime`), an inclusive lower time bound. A STAC API landing page
    is searched (:func:`search_api`); a static source is read whole and narrowed by
    ``collections`` and ``intersects`` (``filter``, ``max_items`` and ``page_size`` need an
    API). Either way the items go through :func:`choose`.
    """
    try:
        window = parse_interval(stac.datetime) if stac.datetime else (None, None)
        box = check_bbox(stac.bbox) if stac.bbox is not None else None
    except ValueError as err:
        raise ConfigError(f"STAC filter: {err}") from None
    window = lower_bound(window, _utc(since) if since is not None else None)
    where, data = read_json(stac.source)
    if is_api_landing_page(data):
        items = search_api(stac, window, box)
    else:
        for name in ("filter", "max_items", "page_size"):
            if getattr(stac, name) is not None:
                raise ConfigError(f"inputs.stac.{name}: needs a STAC API source; {stac.source} is a static "
                                  "catalog (its items are read whole)")
        items = [item for item in items_of(where, data, stac.source)
                 if (stac.collections is None or item.collection_id in stac.collections)
                 and (stac.intersects is None or item_in_geometry(item, stac.intersects))]
        sign = signer(stac.sign)
        if sign is not None:
            for item in items:
                sign(item)
    return choose(items, stac.source, stac.asset, window, box)
