"""Prometheus metrics of one replica (GET /metrics): requests, batch sizes, latency, errors.

A private registry per replica process; with several replicas each answers for itself
(the ``replica`` label says which), and Ray Serve's own metrics cover the whole
application on Ray's metrics port.
"""
from __future__ import annotations

import os
from typing import Any

# The replica's token and Metrics, set by its __init__, read by the HTTP middleware.
REPLICA: dict[str, Any] = {}


class Metrics:
    def __init__(self, replica: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        labels = {"replica": replica}
        self.requests = Counter("perceptual_engine_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry).labels
        self.errors = Counter("perceptual_engine_errors", "HTTP responses with status >= 400",
                              ["route", "status"], registry=self.registry).labels
        self.latency = Histogram("perceptual_engine_request_seconds", "time in the replica per request",
                                 ["route"], registry=self.registry,
                                 buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10)).labels
        self.batch = Histogram("perceptual_engine_batch_size", "pairs per engine call",
                               ["replica"], registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128)).labels(**labels)
        self.pid = os.getpid()

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests(route, str(status)).inc()
        if status >= 400:
            self.errors(route, str(status)).inc()
        self.latency(route).observe(seconds)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
