"""The package version (one place: the package, its records and pyproject read it)."""
__version__ = "0.1.0"
