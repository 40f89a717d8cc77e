"""Benchmarks and the scaling planner (``firecaffe-bench comm|plan|train``), built on the one cost model."""
