"""Scale-out aggregation (issue #14): ``fedmqtt aggregator`` workers that read a share of a job's updates through an
MQTT 5 shared subscription, check them as the coordinator does, and send the coordinator one partial aggregate
per round (see :mod:`fedmqtt.aggregator.worker`)."""
