"""slimserve as a Ray Serve application (``make serve-ray``, ``python -m service.rayserve``):
the same v2 API, model store, batcher and metrics, on as many replicas and nodes as Ray has."""
