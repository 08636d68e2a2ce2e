"""Who may talk to a server: per-call bearer tokens and TLS, for both servers and their clients.

`credentials` reads token and PEM files and builds call metadata with no gRPC (the device's REST
client uses it too); `transport` says where a token may travel in clear text (loopback only) and
where a server may listen without TLS; `grpc_server` is the servers' side: TLS credentials (mutual
TLS with a client CA) and the interceptor that refuses a call without the shared token;
`identity` gives each device its own credential (a tokens file, or a client certificate) and
tells the servicer which device a call comes from.
"""
