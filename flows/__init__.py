"""Prefect flows: thin orchestration over the ``flava`` stage functions (the library never imports Prefect)."""
