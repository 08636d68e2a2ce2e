"""Who may talk to a server: per-call bearer tokens and TLS, for both servers and their clients.

`credentials` reads token and PEM files and builds call metadata with no gRPC (the device's REST
client uses it too); `grpc_server` is the servers' side: TLS credentials and the interceptor that
refuses a call without the right token.
"""
