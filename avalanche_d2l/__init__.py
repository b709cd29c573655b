"""avalanche-d2l: Dream2Learn and Genifer for Avalanche."""

__version__ = "0.1.0"
