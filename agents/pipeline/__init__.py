"""SWARM pipeline parallelism: stage balance, the trainer's routing, the stage wire and its peers."""
