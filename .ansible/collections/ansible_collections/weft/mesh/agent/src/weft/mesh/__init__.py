"""The mesh: peer identity, control connections, gossip, topology and routes."""
