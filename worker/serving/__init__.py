"""The prediction server, `trainyard serve`: registered model versions answering
predictions over HTTP (README "Serving predictions"; docs/architecture.md, "Serving").

    app.py      the WSGI app: routes, tokens, ownership, name -> version (with a TTL)
    cache.py    loaded versions, an LRU bounded in bytes; files hash-checked, warm-up pass
    loader.py   a version's files -> a model on the CPU (model files and exports)
    inputs.py   JSON inputs checked against the model, prepared as in training
    batcher.py  concurrent requests of one version gathered into one forward pass
    stats.py    counts, latencies and batch sizes per version; published to Redis
    wsgi.py     what gunicorn loads

The worker side: it imports torch, and the web process never imports it.
"""
