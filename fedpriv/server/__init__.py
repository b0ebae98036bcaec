"""Server side: the round loop, the run directory and the in-process simulation."""
