"""Networked split training: the gRPC service between a device and a server (see the .proto)."""
