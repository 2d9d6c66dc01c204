"""dispatch-bridge: one Dispatch API connection per site, its schedule as retained MQTT topics."""

__version__ = "0.1.0"
