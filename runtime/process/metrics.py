"""Prometheus metrics of the runtime (prometheus-client); served on metrics_port when set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, start_http_server

from coft.runtime.model.errors import CoftError


class Metrics:
    def __init__(self, cameras: tuple[str, ...] | list[str] = (), sparkplug: bool = False, opcua: bool = False,
                 learning: bool = False):
        self.cameras = list(cameras)
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames_in = Counter("coft_frames_total", "Frames read from the camera", ["camera"], registry=r)
        self.frames_dropped = Counter("coft_frames_dropped_total", "Frames dropped because inference fell behind",
                                      ["camera"], registry=r)
        self.verdicts = Counter("coft_verdicts_total", "Verdicts by outcome (unfired_reject: judged a reject while "
                                "commissioning with rejects off, nothing sent to the line)", ["camera", "verdict"],
                                registry=r)
        self.inference = Histogram("coft_inference_seconds", "Inference time per batch", registry=r,
                                   buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2))
        self.latency = Histogram("coft_capture_to_verdict_seconds", "From frame capture to verdict in the outbox",
                                 registry=r, buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.outbox_depth = Gauge("coft_outbox_depth", "Messages waiting for the broker's ack", registry=r)
        self.broker_up = Gauge("coft_broker_connected", "1 while connected to the broker", ["camera"], registry=r)
        self.camera_up = Gauge("coft_camera_connected", "1 while the camera delivers frames", ["camera"], registry=r)
        self.camera_ended = Gauge("coft_camera_ended", "1 once a file or folder source has no more frames",
                                  ["camera"], registry=r)
        self.verdicts_refused = Counter("coft_verdicts_refused_total", "Verdicts the outbox could not store (disk full)",
                                        ["camera"], registry=r)
        self.outbox_refusing = Gauge("coft_outbox_refusing", "1 while the outbox cannot store verdicts", registry=r)
        self.foreign_runtime = Counter("coft_foreign_heartbeats_total", "Heartbeats of another runtime (another epoch) "
                                       "on this line's camera topics: two boxes numbering one line's verdicts",
                                       ["camera"], registry=r)
        self.outbox_started_anew = Gauge("coft_outbox_new_epoch", "1 from a start whose outbox was lost, rolled back "
                                         "or corrupt (a new epoch) until an operator acknowledges", registry=r)
        self.reserve_refusals = Counter("coft_disk_reserve_refusals_total", "Writes refused because the disk space "
                                        "kept for verdicts (outbox.reserve_mb) was reached, by writer", ["writer"],
                                        registry=r)
        self.score_median = Gauge("coft_score_median", "Median score of the camera's last 200 frames (drift)",
                                  ["camera"], registry=r)
        self.failsafe_rejects = Counter("coft_failsafe_rejects_total", "Triggered parts rejected because no verdict "
                                        "was in by the deadline, by reason", ["camera", "reason"], registry=r)
        self.inspection_failures = Counter("coft_inspection_failures_total", "Batches that could not be scored",
                                           registry=r)
        self.outbox_dropped = Counter("coft_outbox_dropped_total", "Messages dropped from a full outbox (broker away "
                                      "longer than outbox.max_messages lasts)", ["camera"], registry=r)
        self.broker_refused = Counter("coft_broker_refused_total", "Publishes and subscriptions the broker refused "
                                      "(MQTT 5 reason codes: its ACL, mostly)", ["camera"], registry=r)
        self.inspection_waiting = Gauge("coft_inspection_waiting_seconds", "Since the inspector last scored a batch "
                                        "or found nothing waiting; at stall_s the runtime exits", registry=r)
        self.inspection_stalled = Gauge("coft_inspection_stalled", "1 once frames waited stall_s with no verdict",
                                        registry=r)
        self.threshold = Gauge("coft_threshold", "The threshold each camera judges with now (live changes included)",
                               ["camera"], registry=r)
        self.model = Gauge("coft_model_info", "1 for the model the runtime judges with", ["model_id"], registry=r)
        self.engine = Gauge("coft_engine_info", "1 for the engine and arithmetic the runtime judges on",
                            ["engine", "precision"], registry=r)
        self.promise = Gauge("coft_promise_false_reject_ratio", "The false-reject rate the model's threshold "
                             "promises at 95% confidence (absent where it states none)", registry=r)
        if sparkplug:  # only where configured: an alert on 0 must not fire on boxes without the protocol
            self.sparkplug_up = Gauge("coft_sparkplug_connected", "1 while the Sparkplug edge node is connected and "
                                      "its births are out", registry=r)
        if opcua:
            self.opcua_up = Gauge("coft_opcua_serving", "1 while the OPC UA server runs", registry=r)
            self.opcua_certificate_expiry = Gauge("coft_opcua_certificate_expiry_timestamp_seconds", "When the OPC "
                                                  "UA server certificate expires (Unix time; renew with coft "
                                                  "opcua-certificate --renew)", registry=r)
        if learning:  # commissioning.learn: a failed learn must be seen where the line is watched, not only logged
            self.learning = Enum("coft_learning", "Growing the bank after commissioning: waiting for commissioning, "
                                 "learning, done (running the grown revision) or failed (running the commissioned one)",
                                 states=["waiting", "learning", "done", "failed"], registry=r)
        for camera in cameras:  # every camera's series from the start, at 0: a dashboard sees no hole
            for counter in (self.frames_in, self.frames_dropped, self.verdicts_refused, self.outbox_dropped,
                            self.broker_refused, self.foreign_runtime):
                counter.labels(camera)
            for verdict in ("accept", "reject"):
                self.verdicts.labels(camera, verdict)

    def count(self, name: str, camera: str, **labels) -> int:
        """A counter's value for a camera, as the JSON integer a PLC's counter expects."""
        return int(self.registry.get_sample_value(name, {"camera": camera, **labels}) or 0)

    def refused(self) -> int:
        """Verdicts the outbox refused, over every camera."""
        return sum(self.count("coft_verdicts_refused_total", camera) for camera in self.cameras)

    def broker_state(self, camera: str, up: bool) -> None:
        """A camera's broker link connected or lost (the links call it)."""
        self.broker_up.labels(camera).set(int(up))

    def refused_by_broker(self, link: str, what: str) -> None:  # noqa: ARG002  (the link logged what)
        self.broker_refused.labels(link).inc()

    def judging_with(self, model_id: str, thresholds: dict[str, float], engine: tuple[str, str],
                     promise: float | None) -> None:
        """The model, engine, promise and thresholds in force (set once a second: a change shows within it)."""
        for gauge, labels in ((self.model, (model_id,)), (self.engine, engine)):
            for sample in list(next(iter(gauge.collect())).samples):
                if tuple(sample.labels.values()) != labels:
                    gauge.remove(*sample.labels.values())
            gauge.labels(*labels).set(1)
        if promise is not None:
            self.promise.set(promise)
        for camera, value in thresholds.items():
            self.threshold.labels(camera).set(value)

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        try:
            start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:
            raise CoftError(f"metrics_port {port} on {address}: cannot listen ({exc.strerror}); another process "
                            "uses it, or the address is not this box's: change metrics_port or metrics_bind") from None
