"""The single source of edgekit's version (read by pyproject and written into manifests)."""

__version__ = "0.1.0"
