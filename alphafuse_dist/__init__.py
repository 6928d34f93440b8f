"""alphafuse-dist: distributed AlphaFuse training."""
import os as _os

# Keep Ray instances that this package starts in-process on loopback: without this Ray 2.60
# rewrites 127.0.0.1 to the machine's address and listens on every interface. It must be set
# before ray is first imported, hence here. Clients of a real cluster are unaffected.
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

__version__ = "0.1.0"
