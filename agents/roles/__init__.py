"""What an agent does in the swarm once it has joined: one role per agent process.

The agent's lifecycle (`spotrain.agents.daemon`) joins the DHT, publishes status, checks codecs,
watches notices and drains; a role (`base.Role`) does the work in between.
"""
