"""Online serving: an export behind a Ray Serve HTTP deployment with dynamic batching.

Each replica loads the export once (:class:`~alphafuse_dist.serve.recommend.Recommender`, on CPU
or a GPU). A request is one JSON object posted to the route::

    POST /   {"history": ["1", "Heat (1995). Genres: Action|Crime"], "k": 10,
              "exclude_history": false, "new_items": [{"id": "tt01", "text": "..."}]}
    200      {"items": [{"rank": 1, "item_id": ..., "title": ..., "score": ..., "item_idx": ..., "new": false}, ...],
              "dropped": [history entries left out: unknown and no text given]}
    400      {"error": "one line naming the field at fault"}

``history`` holds item ids or titles (oldest first); ``new_items`` are text-only items (placed by
their text, candidates of this request, usable in its history). Requests are validated and resolved
one by one; ``@serve.batch`` then gathers up to ``max_batch_size`` of them (waiting at most
``batch_wait_ms`` for more) into one encoder call and one scoring pass.

Example::

    handle = run_server("runs/quickstart/export-alphafuse-s22", port=8000)   # returns once serving
    # curl -s localhost:8000 -d '{"history": ["1", "260"], "k": 5}'
"""
from __future__ import annotations

import logging
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import AlphaFuseError, ConfigError
from .recommend import Query, Recommender

APP_NAME = "alphafuse"
_log = logging.getLogger(__name__)


def parse_request(body) -> dict:
    """The keyword arguments of :meth:`Recommender.query` from a request body; a ConfigError
    naming the field otherwise."""
    if not isinstance(body, dict):
        raise ConfigError('request: expected a JSON object {"history": [...], "k": 10}')
    unknown = sorted(set(body) - {"history", "k", "exclude_history", "new_items"})
    if unknown:
        raise ConfigError(f"request: unknown field(s) {', '.join(unknown)} (fields: history, k, exclude_history, "
                          "new_items)")
    history = body.get("history")
    if not isinstance(history, list) or not all(isinstance(h, (str, int)) and not isinstance(h, bool)
                                                for h in history):
        raise ConfigError("history: expected a list of item ids or titles (strings or integers)")
    if not isinstance(body.get("exclude_history", False), bool):
        raise ConfigError("exclude_history: expected true or false")
    return {"history": [str(h) for h in history], "k": body.get("k", 10),
            "exclude_history": body.get("exclude_history", False), "new_items": body.get("new_items", [])}


@serve.deployment(name="recommender")
class RecommenderDeployment:
    """One replica: the export loaded on ``device``, requests answered in dynamic batches."""

    def __init__(self, export_dir: str, device: str = "cpu", max_batch_size: int = 32, batch_wait_ms: float = 5.0):
        self.rec = Recommender(export_dir, device=device)
        if self.rec.text_items is not None:
            self.rec.text_items.encoder  # noqa: B018 - the text encoder loads now, not on the first request
        self.answer.set_max_batch_size(max_batch_size)
        self.answer.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    @serve.batch
    async def answer(self, queries: list[Query]) -> list[list[dict]]:
        return self.rec.answer(queries)

    async def __call__(self, request: Request):
        if request.method != "POST":
            return JSONResponse({"error": 'POST a JSON object {"history": [...], "k": 10}'}, status_code=405)
        try:
            body = await request.json()
        except ValueError as e:
            return JSONResponse({"error": f"request: not JSON ({e})"}, status_code=400)
        try:
            query = self.rec.query(**parse_request(body))
        except AlphaFuseError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return {"items": await self.answer(query), "dropped": query.dropped}


def build_app(export_dir: str | Path, device: str = "cpu", replicas: int = 1, max_batch_size: int = 32,
              batch_wait_ms: float = 5.0, cpus_per_replica: float = 1.0):
    """The bound Serve application (one GPU per replica with a CUDA ``device``)."""
    if replicas < 1 or max_batch_size < 1 or batch_wait_ms < 0:
        raise ConfigError(f"--replicas {replicas}, --max-batch-size {max_batch_size}, --batch-wait-ms "
                          f"{batch_wait_ms}: expected replicas >= 1, batch size >= 1, wait >= 0")
    gpus = 1 if str(device).startswith("cuda") else 0
    return RecommenderDeployment.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus},
        max_ongoing_requests=4 * max_batch_size,
    ).bind(str(Path(export_dir).resolve()), device, max_batch_size, batch_wait_ms)


def run_server(export_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, **options):
    """Start Ray (or join ``RAY_ADDRESS``) and Serve on ``host:port``, deploy the export at ``/``
    and return the application's handle once it is serving (``serve.shutdown()`` stops it).
    ``options``: as :func:`build_app`."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(export_dir, **options), name=APP_NAME, route_prefix="/")
    _log.info(f"[serve] {export_dir} at http://{host}:{port}/ ({options.get('device', 'cpu')}, "
              f"{options.get('replicas', 1)} replica(s))")
    return handle
