"""The worker agent: trains, reports its status in the DHT, drains on a preemption notice."""
