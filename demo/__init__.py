"""The bundled demo: tiny offline models, demo images served on loopback, and `make demo`."""
