"""The store of measurement runs: Bluesky documents written to a tiled catalog.

Without a URL the catalog lives under ``state_dir/"tiled"`` and tiled's server app is served
in-process: the client talks to it through starlette's TestClient (an anyio portal thread), so
no network port is opened. The layout there:

- ``catalog.db``: the SQLite catalog (the nodes and the run metadata: start and stop documents);
- ``tables.db``: SQLite tabular storage, for the scalar columns of the event streams;
- ``data/``: file storage, for the arrays (orbit readings) written as zarr.
"""

import copy
import pathlib
import secrets
from collections.abc import Callable
from typing import Any

# The writer of bluesky-tiled-plugins, not bluesky.callbacks.tiled_writer: the latter, an older
# copy, puts array fields into the event table as list<double> columns, which tiled's SQLite
# tabular storage rejects ("Unsupported PyArrow type"); this one writes arrays as zarr nodes.
from bluesky_tiled_plugins import TiledWriter
from tiled.client import from_context, from_uri
from tiled.client.context import Context
from tiled.queries import Key


class RunStore:
    """The Bluesky documents of the measurement runs, in a tiled catalog."""

    def __init__(self, state_dir: pathlib.Path, tiled_url: str | None = None, api_key: str | None = None):
        """Open (or create) the local catalog under ``state_dir/"tiled"``, or connect to ``tiled_url``."""
        if tiled_url is not None:
            self._client = from_uri(tiled_url, api_key=api_key, show_progress=False)
            return
        # Imported here: the server side is needed only for the local catalog.
        from tiled.catalog import from_uri as catalog_from_uri
        from tiled.config import Authentication
        from tiled.server.app import build_app

        folder = pathlib.Path(state_dir) / "tiled"
        (folder / "data").mkdir(parents=True, exist_ok=True)
        database = folder / "catalog.db"
        catalog = catalog_from_uri(
            f"sqlite:///{database}",
            writable_storage=[folder / "data", f"sqlite:///{folder / 'tables.db'}"],
            # Creating the catalog runs `python -m tiled catalog init` in a subprocess (a few seconds).
            init_if_not_exists=not database.exists(),
        )
        app = build_app(catalog, authentication=Authentication(single_user_api_key=secrets.token_hex(16)))
        self._client = from_context(Context.from_app(app, show_progress=False))

    def callback(self) -> Callable[[str, dict], None]:
        """A new document callback writing the runs to the catalog: ``RE.subscribe(store.callback())``.

        It holds the events of a run in memory and writes them at the stop document.
        """
        # max_array_size=0: every array field goes to zarr, even a short one, which the writer would
        # otherwise put in the SQL table, where SQLite cannot hold it.
        return TiledWriter(self._client, max_array_size=0)

    def run(self, uid: str) -> dict:
        """The start and stop documents and the event data of a run; KeyError for an unknown uid.

        The streams hold, for each field of their descriptor and for "time", the list of its
        values, one per event, arrays as nested lists. A run still under way has an empty stop
        document and, until its stop document, no values.
        """
        node = self._client[uid]
        metadata = copy.deepcopy(dict(node.metadata))
        streams = {}
        for name, stream in node.items():
            dataset = stream.read()
            fields = [*stream.metadata["data_keys"], "time"]
            # A field not in the dataset: a run still under way, whose events are not written yet.
            streams[name] = {field: dataset[field].values.tolist() if field in dataset else [] for field in fields}
        return {"start": metadata["start"], "stop": metadata.get("stop") or {}, "streams": streams}

    def search(self, **metadata: Any) -> list[str]:
        """The uids of the runs whose start document has all these ``key == value``."""
        results = self._client
        for key, value in metadata.items():
            results = results.search(Key(f"start.{key}") == value)
        return list(results.keys())

    def close(self) -> None:
        """Close the client and, for the local catalog, shut the in-process server down.

        Call it once the RunEngine is idle: events of an unfinished run are still in the writer.
        """
        self._client.context.close()
