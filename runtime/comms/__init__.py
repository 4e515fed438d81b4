"""Talking to the plant: the outbox, MQTT, Sparkplug B, OPC UA, the live view (web/) and Prometheus metrics."""

__all__ = ["loops", "metrics", "mqtt", "opcua", "opcua_identity", "outbox", "sparkplug", "web"]
