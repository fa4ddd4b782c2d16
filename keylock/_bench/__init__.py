"""Contention benchmarks (``python -m keylock bench``): keylock against the peers, same run."""
