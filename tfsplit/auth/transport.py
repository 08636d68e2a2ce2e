"""Where a token may travel in clear text (loopback only), and where a server may listen without TLS.

Secure by default, on both sides:
- a server bound to anything other than loopback refuses to start without TLS unless its operator
  says `--insecure` (`check_listen`), and the tool then logs a warning on every start;
- a client refuses to send a token over a plain channel to anything other than loopback
  (`check_token_transport`), before it connects: the token would cross the network readable by
  anyone on the path.

Only an IP literal of the loopback range (127.0.0.0/8, ::1, an IPv4-mapped loopback) or the name
`localhost` counts as loopback; no name is resolved, so no lookup can turn a remote host into a
local one. A gRPC Unix domain socket (`unix:`, `unix-abstract:`) is local too.
"""

import ipaddress

_LOCAL_SCHEMES = ("unix:", "unix-abstract:")
_MAX_SHOWN = 80  # characters of an address echoed in an error


def is_loopback(host):
    """Whether `host` (an IP literal, possibly in brackets, or a name) is this machine's loopback."""
    if not isinstance(host, str):
        return False
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.split("%", 1)[0]  # an IPv6 zone index
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def target_host(target):
    """The host of a gRPC target ("host:port", "[v6]:port", "dns:///host:port", "ipv4:a:port")
    or of a URL's authority ("host:port"); None for a Unix domain socket."""
    if target.startswith(_LOCAL_SCHEMES):
        return None
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            if target.startswith("//"):  # dns://authority/host:port
                target = target[2:].partition("/")[2]
            target = target.partition(",")[0]  # ipv4:a:p,b:p -> the first address
            break
    if target.startswith("["):
        return target[1 : target.find("]")] if "]" in target else target
    host, colon, _ = target.rpartition(":")
    return host if colon else target


def is_local_target(target):
    """Whether a gRPC target reaches only this machine (loopback or a Unix domain socket)."""
    host = target_host(target)
    return host is None or is_loopback(host)


def check_token_transport(target, token, tls, what="token"):
    """Refuses (ValueError) to send `token` over a plain channel to a target off this machine.

    Args:
      target: the gRPC target or the URL's host:port.
      token: the token to be sent; None or "" sends none and passes.
      tls: whether the channel is TLS.
      what: how the error names the caller's argument.
    """
    if not token or tls or is_local_target(target):
        return
    raise ValueError(
        f"Refusing to send the {what} in clear text to {target[:_MAX_SHOWN]!r}, which is not "
        "loopback: use TLS (the server's CA: --tls_ca, `root_certificates`), or reach the server "
        "on 127.0.0.1 (an SSH tunnel)."
    )


def check_listen(host, tls, insecure):
    """Whether a server may listen on `host`; returns a warning to log, or None.

    Without TLS only loopback is allowed, unless `insecure`: then the warning says what is
    exposed (the tool logs it on every start).

    Raises:
      ValueError: `host` is not loopback, there is no TLS and `insecure` is False.
    """
    if tls or is_loopback(host):
        return None
    shown = repr(host[:_MAX_SHOWN]) if isinstance(host, str) else repr(host)
    if not insecure:
        raise ValueError(
            f"Refusing to listen on {shown} without TLS: tokens and tensors would cross the "
            "network in clear text. Give --tls_cert and --tls_key, listen on 127.0.0.1, or pass "
            "--insecure on a network you trust."
        )
    return (
        f"--insecure: listening on {shown} without TLS. Anyone on the network path can read the "
        "tokens and tensors, replay or alter calls, and act as any device."
    )
