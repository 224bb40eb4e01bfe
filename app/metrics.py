"""Prometheus metrics of the web process, in a registry per app (tests build several apps).

A front of several web processes (app.serve.serve_processes) sets PROMETHEUS_MULTIPROC_DIR
before any of them imports prometheus_client: each process then writes its values to files
there, and `/metrics`, whichever process answers it, sums them (`exposition`). The canary
analysis reads these counters twice and takes the difference, so they must be the front's,
not one process's."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Request counts/latency by route and status, task latency, batch sizes, queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("modelserve_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("modelserve_http_request_duration_seconds",
                                 "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.task_latency = Histogram("modelserve_task_duration_seconds",
                                      "Round trip of one prediction task (publish to result)",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("modelserve_batch_rows", "Rows per prediction task",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096,
                                             10000, 100000), registry=r)
        self.rows = Counter("modelserve_predicted_rows", "Rows scored", registry=r)
        self.queue_depth = Gauge("modelserve_queue_depth",
                                 "Messages waiting in the predict queue (-1: unknown)",
                                 multiprocess_mode="mostrecent", registry=r)

    def observe_batch(self, rows: int, seconds: float) -> None:
        """Record one answered task."""
        self.task_latency.observe(seconds)
        self.batch_rows.observe(rows)
        self.rows.inc(rows)

    def exposition(self) -> bytes:
        """The prometheus text of this front: this registry's, or every web process's."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
