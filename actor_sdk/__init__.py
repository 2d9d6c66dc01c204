"""Actor SDK: manage actors from the schedule a dispatch-bridge publishes over MQTT."""
