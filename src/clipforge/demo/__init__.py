"""The demo: generated data -> training -> evaluation -> search index -> report (`clipforge demo`)."""

from .pipeline import THRESHOLDS, DemoSettings, demo_recipe, run_demo

__all__ = ["THRESHOLDS", "DemoSettings", "demo_recipe", "run_demo"]
