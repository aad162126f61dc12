"""Worker processes of the host: the encoder backends and the worker loop."""
