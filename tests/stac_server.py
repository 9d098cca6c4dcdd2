"""A real STAC API on 127.0.0.1 for tests: stac-fastapi-geoparquet over a stac-geoparquet file.

The items live in one stac-geoparquet file that DuckDB (through rustac) reads on every
search, so a test adds tonight's items by rewriting the file (:meth:`StacApiServer.publish`).
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

import rustac
import rustac_duckdb_extensions
import uvicorn
from stac_fastapi.geoparquet.api import create
from stac_fastapi.geoparquet.settings import Settings


class StacApiServer:
    """stac-fastapi-geoparquet serving ``items`` (STAC item dicts) from ``folder``/items.parquet."""

    def __init__(self, folder: Path, items: list[dict[str, Any]]):
        self.parquet = folder / "items.parquet"
        self.requests: list[tuple[str, str, Any]] = []
        self.publish(items)
        client = rustac.DuckdbClient(extension_directory=rustac_duckdb_extensions.extension_directory(),
                                     install_extensions=False)
        settings = Settings(stac_fastapi_geoparquet_href=str(self.parquet), stac_fastapi_landing_id="test-api",
                            stac_fastapi_title="test STAC API", stac_fastapi_description="items for the tests")
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

    async def _record(self, request, call_next):
        body = await request.body()
        self.requests.append((request.method, request.url.path, json.loads(body) if body else None))
        return await call_next(request)

    def publish(self, items: list[dict[str, Any]]) -> None:
        """Replace the served items (written beside, then renamed: a search sees old or new)."""
        fresh = self.parquet.with_suffix(".new.parquet")
        rustac.write_sync(str(fresh), items)
        os.replace(fresh, self.parquet)

    def searches(self) -> list[tuple[str, Any]]:
        """(method, body) of each /search request so far."""
        return [(method, body) for method, path, body in self.requests if path == "/search"]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
