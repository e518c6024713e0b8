"""Benchmarks of HSI Cluster on the third-party scenes in ../shared/data (never committed)."""
