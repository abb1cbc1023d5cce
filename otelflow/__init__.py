"""otelflow: an OpenTelemetry-native network-flow agent for Kubernetes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("otelflow")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
