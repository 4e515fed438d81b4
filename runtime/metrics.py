"""Prometheus metrics of the runtime (prometheus-client); served on metrics_port when set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames_in = Counter("coft_frames_total", "Frames read from the camera", ["camera"], registry=r)
        self.frames_dropped = Counter("coft_frames_dropped_total", "Frames dropped because inference fell behind",
                                      ["camera"], registry=r)
        self.verdicts = Counter("coft_verdicts_total", "Verdicts by outcome", ["camera", "verdict"], registry=r)
        self.inference = Histogram("coft_inference_seconds", "Inference time per batch", registry=r,
                                   buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2))
        self.latency = Histogram("coft_capture_to_verdict_seconds", "From frame capture to verdict in the outbox",
                                 registry=r, buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.outbox_depth = Gauge("coft_outbox_depth", "Messages waiting for the broker's ack", registry=r)
        self.broker_up = Gauge("coft_broker_connected", "1 while connected to the broker", ["camera"], registry=r)
        self.camera_up = Gauge("coft_camera_connected", "1 while the camera delivers frames", ["camera"], registry=r)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
