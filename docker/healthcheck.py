#!/usr/bin/env python3
"""Container health (the image's HEALTHCHECK): does the broker this container needs answer MQTT?

``fedmqtt-healthcheck``            the broker in $FEDMQTT_BROKER (coordinator, device), else this container's own
                                   listener (the broker role: 127.0.0.1:$FEDMQTT_LISTEN_PORT, default 1883)
``fedmqtt-healthcheck listener``   this container's own listener, whatever $FEDMQTT_BROKER says

A broker that answers a CONNECT with any CONNACK, even "not authorised", is serving (fedmqtt.broker.net.mqtt_probe);
the broker role starts its listener only after its accounts exist. Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    from fedmqtt.broker.net import mqtt_probe
    from fedmqtt.mqtt.url import parse_broker_url

    url = None if argv[1:2] == ["listener"] else os.environ.get("FEDMQTT_BROKER")
    if url:
        broker = parse_broker_url(url)
        host, port, tls = broker.host, broker.port, broker.tls
    else:
        host, port, tls = "127.0.0.1", int(os.environ.get("FEDMQTT_LISTEN_PORT") or 1883), False
    if mqtt_probe(host, port, tls=tls, timeout=3.0):
        return 0
    print(f"no MQTT answer from {host}:{port}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
