"""Online age prediction with Ray Serve: a FastAPI ingress over the shared ``Predictor``.

    serve run serve_config.yaml                                # the checkpoint is in the config's args
    age serve --checkpoint runs/faces/train/best [--port 8000] [--replicas 2]

Routes: ``POST /v1/age`` (one photo, multipart field ``file`` or a raw image body: every face's box
and age), ``POST /v1/age/batch`` (multipart, up to ``MAX_FILES`` ``files``: each photo's largest
face), ``POST /v1/verify?min_age=18``, ``GET /healthz``, ``GET /v1/model``, ``GET /docs`` and an
upload page at ``/``. ``detect_faces`` (default ``auto``) takes a face crop framed like the training
crops as it is and finds and aligns the faces of any other photo; ``false`` is the fast path for
face crops. Every refusal answers ``{"error": REASON, "message": TEXT}`` (``schema.REFUSALS``);
docs/serving.md describes each route.

The rooms: ``schema`` (the HTTP contract), ``http`` (app, refusals, metrics, bounded reads),
``batching`` (forward passes shared by concurrent requests), ``app`` (the deployment and its builder).
"""

from ray_jobs.serve.app import AgeService, age_app, build_app, main, parse_args

__all__ = ["AgeService", "age_app", "build_app", "main", "parse_args"]
