"""The package version, in a module of its own so that any stage can record it (the
checkpoint manifest does) without importing the package's public names."""

__version__ = "0.1.0"
