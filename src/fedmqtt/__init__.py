"""fedmqtt: federated learning for IoT and mobile devices, with MQTT as the only transport."""

__version__ = "0.1.0"
