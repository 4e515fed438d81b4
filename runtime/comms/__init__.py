"""Talking to the plant: the recorder and the outbox, MQTT, Sparkplug B, OPC UA, the live view (web/); the
services and the line's view they are given."""
