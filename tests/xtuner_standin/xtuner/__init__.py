"""A stand-in for XTuner in tests: see ../README.md. Nothing here trains anything."""

__version__ = "0.2.0+standin"
