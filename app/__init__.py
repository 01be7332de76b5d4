"""autonomy: run fleets of autonomous workers safely."""

__version__ = "0.1.0"
