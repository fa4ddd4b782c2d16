"""The delaying, dropping, cutting TCP proxy of the fault tests: it lives in the benchmark
package (``keylock._bench._proxy``), which puts a 40 ms round trip in front of Redis too."""

from keylock._bench._proxy import Counters, Faults, Proxy

__all__ = ["Counters", "Faults", "Proxy"]
