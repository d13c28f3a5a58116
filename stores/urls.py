"""Bucket URLs: `scheme://bucket/prefix?option=value`, read strictly (one value per option,
only the options a scheme takes), so a typo is an error rather than a silently ignored setting."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from spotrain.stores.base import StoreURLError


@dataclass(frozen=True)
class BucketURL:
    bucket: str
    prefix: str  # no leading or trailing slash; "" is the bucket's root
    options: dict[str, str]


def parse_bucket_url(url: str, scheme: str, allowed: frozenset[str]) -> BucketURL:
    parts = urlsplit(url)
    if parts.scheme != scheme or not parts.netloc or parts.fragment:
        raise StoreURLError(f"checkpoint store {url!r}: expected {scheme}://BUCKET/PREFIX")
    try:
        query = parse_qs(parts.query, keep_blank_values=False, strict_parsing=bool(parts.query))
    except ValueError:
        raise StoreURLError(f"checkpoint store {url!r}: unreadable options {parts.query!r}") from None
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise StoreURLError(f"checkpoint store {url!r}: unknown option {unknown[0]!r} "
                            f"(known: {', '.join(sorted(allowed)) or 'none'})")
    repeated = sorted(name for name, values in query.items() if len(values) > 1)
    if repeated:
        raise StoreURLError(f"checkpoint store {url!r}: option {repeated[0]!r} given twice")
    return BucketURL(parts.netloc, parts.path.strip("/"), {name: values[0] for name, values in query.items()})


def join_key(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key
