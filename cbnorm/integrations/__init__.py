"""Integrations of the recorder (``cbnorm.watch``) with training frameworks: ``lightning`` (a callback).
Each module imports its framework, an optional dependency (``pip install cbnorm[lightning]``)."""
