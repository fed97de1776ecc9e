"""The agent's local API (unix socket), its read-only status and metrics port, and the CLI client."""

DEFAULT_SOCKET = "/run/weft/weft.sock"
