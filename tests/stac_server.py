"""A real STAC API on 127.0.0.1 for tests: stac-fastapi-geoparquet over a stac-geoparquet file.

Each collection's items live in a stac-geoparquet file of their own (the server searches a
collection's file, and a file holding two collections would answer for both), listed in a
collections.json; DuckDB (through rustac) reads the file on every search, so a test adds
tonight's items by rewriting it (:meth:`StacApiServer.publish`).
DuckDB's spatial, icu and parquet extensions come from the ``rustac-duckdb-extensions``
package (pinned with rustac in pyproject's ``test`` extra, both for DuckDB 1.5.1): nothing is
downloaded when the server starts.

Every request the server answers is recorded (method, path, JSON body) so tests can see
the pages pystac-client asked for.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pystac
import pystac.utils
import rustac
import rustac_duckdb_extensions
import shapely.geometry
import uvicorn
from stac_fastapi.geoparquet.api import create
from stac_fastapi.geoparquet.settings import Settings

GEOPARQUET = "application/vnd.apache.parquet"  # the media type that marks a collection's items file


class StacApiServer:
    """stac-fastapi-geoparquet serving ``items`` (STAC item dicts) from files in ``folder``.

    The collections are those of ``items``, fixed when the server starts.
    """

    def __init__(self, folder: Path, items: list[dict[str, Any]]):
        self.folder = folder
        self.requests: list[tuple[str, str, Any]] = []
        self.collections = sorted({item["collection"] for item in items})
        listing = [self._collection(cid, [i for i in items if i["collection"] == cid]) for cid in self.collections]
        (folder / "collections.json").write_text(json.dumps(listing))
        self.publish(items)
        client = rustac.DuckdbClient(extension_directory=rustac_duckdb_extensions.extension_directory(),
                                     install_extensions=False)
        settings = Settings(stac_fastapi_collections_href=str(folder / "collections.json"),
                            stac_fastapi_collections_reload_seconds=24 * 3600,
                            stac_fastapi_landing_id="test-api", stac_fastapi_title="test STAC API",
                            stac_fastapi_description="items for the tests")
        self.app = create(settings, client).app
        self.app.middleware("http")(self._record)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, lifespan="on", log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the STAC API server did not start")
            time.sleep(0.05)

    def _parquet(self, collection: str) -> Path:
        return self.folder / f"{collection}.parquet"

    def _collection(self, cid: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        footprints = [shapely.geometry.shape(i["geometry"]).bounds for i in items]
        times = sorted(pystac.utils.str_to_datetime(i["properties"]["datetime"]) for i in items)
        extent = pystac.Extent(
            pystac.SpatialExtent([[min(b[0] for b in footprints), min(b[1] for b in footprints),
                                   max(b[2] for b in footprints), max(b[3] for b in footprints)]]),
            pystac.TemporalExtent([[times[0], None]]))
        collection = pystac.Collection(id=cid, description=f"test collection {cid}", extent=extent,
                                       license="CC-BY-4.0")
        collection.add_asset("data", pystac.Asset(href=str(self._parquet(cid)), media_type=GEOPARQUET))
        return collection.to_dict(include_self_link=False)

    async def _record(self, request, call_next):
        body = await request.body()
        self.requests.append((request.method, request.url.path, json.loads(body) if body else None))
        return await call_next(request)

    def publish(self, items: list[dict[str, Any]]) -> None:
        """Replace the served items of each collection (each file written beside, then renamed:
        a search sees the old items or the new)."""
        for cid in self.collections:
            mine = [i for i in items if i["collection"] == cid]
            fresh = self._parquet(cid).with_suffix(".new.parquet")
            rustac.write_sync(str(fresh), mine)
            os.replace(fresh, self._parquet(cid))
        unknown = {i["collection"] for i in items} - set(self.collections)
        if unknown:
            raise ValueError(f"collections {sorted(unknown)} were not served from the start")

    def searches(self) -> list[tuple[str, Any]]:
        """(method, body) of each /search request so far."""
        return [(method, body) for method, path, body in self.requests if path == "/search"]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
