"""fastmesh: an API gateway and service-mesh sidecar with a Cython data path on uvloop."""

__version__ = "0.1.0"
