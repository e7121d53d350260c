"""pyro_flowguides."""
