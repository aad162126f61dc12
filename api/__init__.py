"""The HTTP API's parts, assembled by ``api_server.create_app``.

- ``settings``: the server's settings (``config.api_config``) and their ``--help`` text.
- ``state``: ``AppState``, what the routes share (``app.state.api``), and the app's lifespan.
- ``errors``: the one mapping of errors to HTTP status and body, and the exception handlers.
- ``guards``: the body limit, the host/origin/key guard, and each route's admission.
- ``schemas``: the request bodies and their input bounds.
- ``tokens``: the served model's names and tokenizer for the embeddings routes.
- ``metrics``: per-route HTTP metrics.
- ``routers``: ``health``, ``openai``, ``tei``, ``rag``, ``documents`` and ``page``.

The ingestion jobs that ``/documents`` starts are ``tablerag.jobs``; the answers of ``/chat``
and the citations of ``/search`` are ``tablerag.answers``.
"""
