"""The mesh: `fastmesh sidecar`, the service registry, and transparent interception."""
