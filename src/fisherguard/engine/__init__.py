"""Round loops that drive clients and a defense: the in-process simulator (and later Flower)."""
