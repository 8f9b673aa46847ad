"""A small, cheap HTTP load generator: keep-alive ``http.client`` connections, one per thread.

Reports throughput, latency percentiles, status counts and the generator's own CPU share,
so a benchmark on a 2-core machine can say how much of the machine the client took.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    seconds: float
    statuses: dict[int, int]
    latencies_ms: list[float]
    client_cpu_share: float  # of the whole machine (all cores)
    latencies_by_status: dict[int, list[float]] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]

    def row(self) -> dict:
        return {"concurrency": self.concurrency, "requests": self.requests, "img_per_s": round(self.throughput, 1),
                "p50_ms": round(self.percentile(50), 1), "p99_ms": round(self.percentile(99), 1),
                "errors": sum(n for s, n in self.statuses.items() if s != 200),
                "client_cpu_share": round(self.client_cpu_share, 3)}


def run_load(url: str, path: str, payloads: list[bytes], concurrency: int, total: int, headers: dict[str, str],
             timeout: float = 60.0) -> LoadResult:
    """Send ``total`` POSTs (cycling through ``payloads``) from ``concurrency`` threads."""
    parts = urlsplit(url)
    counter = iter(range(total))
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    by_status: dict[int, list[float]] = {}

    def worker() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body = payloads[i % len(payloads)]
            start = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers | {"Content-Length": str(len(body))})
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
                status = -1
            elapsed = (time.perf_counter() - start) * 1000
            with lock:
                latencies.append(elapsed)
                statuses[status] = statuses.get(status, 0) + 1
                by_status.setdefault(status, []).append(elapsed)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    return LoadResult(concurrency, total, wall, statuses, latencies, cpu / wall / (os.cpu_count() or 1), by_status)
