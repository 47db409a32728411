"""Member side: the Flower ClientApp, the local training recipe, node-local state."""
