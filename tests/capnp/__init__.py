"""The Cap'n Proto schema of our messages and helpers driving the reference ``capnp`` tool."""
