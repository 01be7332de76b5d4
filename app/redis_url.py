"""Where Redis is: one server (``redis://``, ``rediss://``, ``unix://``), or a primary
found through Redis Sentinel (``redis+sentinel://``), so that a failover -- Sentinel
promoting a replica -- is followed by every client without a restart (issue 22).

The Sentinel form names the sentinels, the master's name and the database::

    redis+sentinel://[[username]:password@]host1:26379,host2:26379,host3/mymaster[/db]
                     [?sentinel_password=...&sentinel_username=...]

- the hosts are the *sentinels* (port 26379 when left out), never the data servers;
- the password (and username) in front are the data servers' (``requirepass``/ACL), as
  in ``redis://``; the sentinels' own, when they have one, is ``sentinel_password``;
- the path is the master's name (Sentinel's ``monitor`` name), then the database (0).

It is what redis-py's ``redis.sentinel.Sentinel(...).master_for(name)`` takes, and what
Celery's ``sentinel://`` broker and result backend take (``master_name`` in their
transport options): ``sentinel`` builds both from it. Anything else (no host, no master
name, a bad port or database, an unknown option) is refused with one line saying what.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
_OPTIONS = ("sentinel_password", "sentinel_username")


@dataclass(frozen=True)
class SentinelTarget:
    """A Redis primary found through its sentinels."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def celery_url(self) -> str:
        """Celery's (kombu's) form: ``sentinel://[:pw@]h1:26379/db;sentinel://...``. The
        password given there is the data servers'; the sentinels' goes in the transport
        options (``celery_options``)."""
        auth = ""
        if self.password is not None:
            user = quote(self.username or "", safe="")
            auth = f"{user}:{quote(self.password, safe='')}@"
        return ";".join(f"sentinel://{auth}{_host(h)}:{p}/{self.db}" for h, p in self.sentinels)

    def celery_options(self) -> dict[str, object]:
        """The transport options Celery's broker and result backend need beside the URL."""
        opts: dict[str, object] = {"master_name": self.master_name}
        sentinel_kwargs = self.sentinel_kwargs()
        if sentinel_kwargs:
            opts["sentinel_kwargs"] = sentinel_kwargs
        return opts

    def sentinel_kwargs(self) -> dict[str, str]:
        """How to log in to the sentinels themselves (empty: they need no password)."""
        out: dict[str, str] = {}
        if self.sentinel_password is not None:
            out["password"] = self.sentinel_password
        if self.sentinel_username is not None:
            out["username"] = self.sentinel_username
        return out

    def safe(self) -> str:
        """The URL with its passwords hidden."""
        auth = "***@" if self.password is not None else ""
        hosts = ",".join(f"{_host(h)}:{p}" for h, p in self.sentinels)
        return f"{SENTINEL_SCHEME}://{auth}{hosts}/{self.master_name}/{self.db}"


def is_sentinel(url: str) -> bool:
    """Is ``url`` the Sentinel form?"""
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel(url: str) -> SentinelTarget:
    """The sentinels, master name and database of a ``redis+sentinel://`` URL; raises
    ``ValueError`` saying what is wrong (never echoing a password)."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme.lower() != SENTINEL_SCHEME:
        raise ValueError(f"a Sentinel URL starts with {SENTINEL_SCHEME}://")
    rest, _, query = rest.partition("?")
    rest = rest.split("#", 1)[0]
    netloc, _, path = rest.partition("/")
    auth, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = auth.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
        if not colon:  # "secret@host": redis-py reads a lone word as the password
            username, password = None, unquote(user)
    sentinels = tuple(_sentinel_address(h) for h in hosts.split(",") if h.strip())
    if not sentinels:
        raise ValueError("a Sentinel URL names at least one sentinel: "
                         f"{SENTINEL_SCHEME}://host:{SENTINEL_PORT}/mymaster/0")
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError("a Sentinel URL names the master after the hosts: "
                         f"{SENTINEL_SCHEME}://host:{SENTINEL_PORT}/mymaster/0")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError("a Sentinel URL's path is /<master name>[/<db number>], "
                         f"not /{'/'.join(parts)}")
    options = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"unknown Sentinel URL option(s) {', '.join(unknown)}: "
                         f"known are {', '.join(_OPTIONS)}")
    return SentinelTarget(
        sentinels=sentinels, master_name=unquote(parts[0]),
        db=int(parts[1]) if len(parts) == 2 else 0, username=username, password=password,
        sentinel_username=options.get("sentinel_username", [None])[-1],
        sentinel_password=options.get("sentinel_password", [None])[-1])


def check_redis_url(url: str) -> str:
    """``url`` unchanged; a ``redis+sentinel://`` one that cannot be used raises
    ``ValueError`` saying why (the other schemes are redis-py's to judge)."""
    if is_sentinel(url):
        parse_sentinel(url)
    return url


def _sentinel_address(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [v6 address]:port
        host, _, tail = text[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"a sentinel address needs a host: {text!r}")
    if port_text and not port_text.isdigit():
        raise ValueError(f"a sentinel's port is a number: {text!r}")
    port = int(port_text) if port_text else SENTINEL_PORT
    if not 0 < port < 65536:
        raise ValueError(f"a sentinel's port is 1..65535: {text!r}")
    return host, port


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
