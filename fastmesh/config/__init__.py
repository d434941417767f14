"""Declarative configuration: load, validate, and the validated model."""
from fastmesh.config.model import (
    Config, ConfigError, ConfigIssue, GatewaySettings, Limits, Route, Service, UpstreamKeepalive,
)
from fastmesh.config.loader import load_config, load_config_data

__all__ = [
    "Config", "ConfigError", "ConfigIssue", "GatewaySettings", "Limits", "Route", "Service",
    "UpstreamKeepalive", "load_config", "load_config_data",
]
