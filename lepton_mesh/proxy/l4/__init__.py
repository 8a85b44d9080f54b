"""Byte tunnels: TCP (L4) services and upgraded (WebSocket) connections."""
