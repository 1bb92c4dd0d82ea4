"""asyncvmm: a Firecracker-compatible microVM monitor on asyncio and Linux KVM."""

__version__ = "0.1.0"

# The Firecracker API version whose contract asyncvmm implements; reported by
# GET /version, GET / and --version so that clients gating on it work unchanged.
FIRECRACKER_API_VERSION = "1.16.1"
