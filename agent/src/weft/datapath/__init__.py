"""The data plane: the bridge, container attach, the kernel fast path, the encrypted userspace path."""

from weft.footprint import pyroute2_package

pyroute2_package()  # rtnetlink alone, not every netlink family pyroute2 has (see weft.footprint)
