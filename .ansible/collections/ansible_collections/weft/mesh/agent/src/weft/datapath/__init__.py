"""The data plane: the bridge, container attach, the kernel fast path, the encrypted userspace path."""
