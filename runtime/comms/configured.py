"""The services a line's config turns on (comms/service.py), built in the order they start."""

from __future__ import annotations

from coft.runtime.comms.outbox import Outbox
from coft.runtime.comms.service import Service
from coft.runtime.comms.view import LineControls, LineView
from coft.runtime.config import RuntimeConfig
from coft.runtime.process.metrics import Metrics


def configured_services(config: RuntimeConfig, view: LineView, controls: LineControls, outbox: Outbox,
                        metrics: Metrics) -> list[Service]:
    """The optional parts the config turns on, in the order they start (each module is imported only where
    its block is set: protobuf, asyncua and aiohttp stay off boxes that do not speak them)."""
    services: list[Service] = []
    if config.web:
        from coft.runtime.comms.web import WebServer
        services.append(WebServer(view, controls, config.web))
    if config.opcua:
        from coft.runtime.comms.opcua import OpcUaServer
        services.append(OpcUaServer(view, controls, config.opcua, metrics))
    if config.sparkplug:
        from coft.runtime.comms.sparkplug import SparkplugNode
        node = SparkplugNode(  # MQTT 3.1.1: over 5 its QoS 0 DDATA showed a seq gap, cause not yet found
            config.broker.model_copy(update={"protocol": "3.1.1"}), config.sparkplug, outbox, view.cameras,
            config.outbox.path.parent / "sparkplug-bdseq",
            lambda camera, value: controls.set_threshold(camera, repr(value), "sparkplug"),
            view.threshold_of, view.verdict_counts, lambda: view.model_id, metrics)
        node.on_refused = metrics.refused_by_broker
        services.append(node)
    return services
