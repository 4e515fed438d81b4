"""Edge runtime: model bundles, scoring and (later) camera-to-MQTT. Never imports torch."""
