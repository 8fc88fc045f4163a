"""Every way an image reaches the model, and the safety checks on each: `load_image(ref, policy) -> PIL RGB image`.

`ref` is an http(s) URL, an `s3://bucket/key` URI (read with boto3; `AWS_ENDPOINT_URL_S3` points it elsewhere),
a `data:` URI or raw base64. Anything else with a scheme (file://, ftp://, ...) is refused, and a local path is
never opened: it is not valid base64, so it fails as such.

URL fetches are SSRF-safe: http(s) only; the host is resolved and EVERY address must be public (not loopback,
private, link-local such as 169.254.169.254, reserved, multicast or unspecified) unless it lies in
`policy.allow_networks`; the connection goes to the address that was checked (no second DNS lookup to rebind);
redirects are followed by hand, at most `max_redirects`, each re-checked the same way; connect and read time out;
the body is capped while it streams. Decoding caps the pixel count before pixels are decoded (decompression
bombs), takes the first frame of animations, applies EXIF orientation and turns every mode into RGB.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import io
import ipaddress
import re
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

from serve.engine import preshrink
from serve.engine.errors import ApiError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 20 * 1024 * 1024  # fetched (URL/S3) image size cap
    max_pixels: int = 25_000_000
    fetch_timeout_s: float = 10.0
    max_redirects: int = 3
    allow_networks: tuple = ()  # ipaddress networks exempt from the public-address rule
    s3_buckets: tuple[str, ...] | None = None  # buckets s3:// images may come from; None: any the role can read

    @classmethod
    def from_config(cls, cfg: Any) -> ImagePolicy:
        return cls(max_bytes=cfg.max_image_bytes, max_pixels=cfg.max_image_pixels,
                   fetch_timeout_s=cfg.fetch_timeout_s, max_redirects=cfg.fetch_max_redirects,
                   allow_networks=tuple(cfg.fetch_allow_networks), s3_buckets=cfg.s3_buckets)


def load_image(ref: str, policy: ImagePolicy, *, deadline: float | None = None, shrink_for: Any = None):
    """Fetch or decode `ref` into a PIL RGB image, or raise ApiError (invalid_image, image_too_large,
    url_not_allowed, image_fetch_failed, timeout)."""
    return decode_image(image_bytes(ref, policy, deadline=deadline), policy.max_pixels, shrink_for=shrink_for)


def is_remote(ref: str) -> bool:
    """Whether getting `ref`'s bytes means network I/O (an http(s) or s3 fetch), not just decoding."""
    return ref.lstrip()[:10].lower().startswith(("http://", "https://", "s3://"))


def image_bytes(ref: str, policy: ImagePolicy, *, deadline: float | None = None) -> bytes:
    """The encoded image `ref` stands for: fetched (http(s), s3) or decoded (data: URI, base64); ApiError as
    `load_image`."""
    ref = ref.strip()
    lowered = ref[:10].lower()
    if lowered.startswith("data:"):
        data = decode_data_uri(ref)
    elif lowered.startswith(("http://", "https://")):
        data = fetch_url(ref, policy, deadline=deadline)
    elif lowered.startswith("s3://"):
        data = fetch_s3(ref, policy, deadline=deadline)
    elif _SCHEME.match(ref) and "://" in ref[:20]:
        scheme = ref.split(":", 1)[0]
        raise ApiError("url_not_allowed", f"image URL scheme {scheme!r} is not allowed; use http(s)://, s3://, "
                                          "a data: URI or base64")
    else:
        data = decode_base64(ref)
    return data


# ---------------------------------------------------------------------------------------------- decoding
def decode_base64(text: str) -> bytes:
    if text and len(text) % 4 == 0:
        try:  # the usual case (padded standard base64, no whitespace) without the regex pass over it (0.3 ms/MB)
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            pass
    compact = re.sub(r"\s+", "", text)
    if not compact:
        raise ApiError("invalid_image", "image is empty")
    compact += "=" * (-len(compact) % 4)  # tolerate stripped padding
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    try:
        return base64.b64decode(compact, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError("invalid_image", "image is neither valid base64 nor an http(s)://, s3:// or data: URI") \
            from None


def decode_data_uri(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ApiError("invalid_image", "data: URI has no ',' before its data")
    if header.lower().endswith(";base64"):
        return decode_base64(payload)
    return unquote_to_bytes(payload)


def decode_image(data: bytes, max_pixels: int, *, shrink_for: Any = None):
    """Bytes -> PIL RGB image, refusing more than `max_pixels` before any pixel is decoded.

    With `shrink_for` (the model's image processor) a big image comes back already padded and shrunk for it
    (serve.engine.preshrink: same pixel values within a few levels, a fraction of the time; JPEGs decode at reduced
    scale), so that work happens here, on the request's thread, not on the generation thread."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise ApiError("image_too_large", f"image has more than {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise ApiError("invalid_image", "image bytes are not a decodable PNG, JPEG, WebP, GIF, BMP or TIFF") \
            from None
    width, height = img.size
    if width * height > max_pixels:
        raise ApiError("image_too_large", f"image is {width}x{height} = {width * height} pixels; the limit is "
                                          f"{max_pixels}")
    if width == 0 or height == 0:
        raise ApiError("invalid_image", "image has no pixels")
    try:
        img.seek(0)  # the first frame of an animation
        if shrink_for is not None:
            preshrink.draft(img, shrink_for)
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # not a copy of every image without an orientation (0.6 ms)
        img = to_rgb(img)
        return preshrink.preshrink(img, shrink_for) if shrink_for is not None else img
    except Image.DecompressionBombError:
        raise ApiError("image_too_large", f"image has more than {max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error):
        raise ApiError("invalid_image", "image data is truncated or corrupt") from None


def to_rgb(img):
    """Any PIL mode -> RGB: transparency composited on white, 16-bit and float greys scaled, not clipped."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _scaled_grey(img).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        if mode == "La":
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _scaled_grey(img):
    import numpy as np
    from PIL import Image

    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
    else:
        top = 65535.0 if img.mode.startswith("I;16") or (arr.size and arr.max() > 255) else 255.0
    grey = np.clip(np.nan_to_num(arr) * (255.0 / top), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey, mode="L")


# ---------------------------------------------------------------------------------------------- URL fetch
def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_networks: tuple = ()) -> bool:
    """Public unicast only, unless an allow-listed network holds the address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in allow_networks):
        return True
    return ip.is_global and not ip.is_multicast


def resolve_checked(host: str, port: int, policy: ImagePolicy) -> str:
    """Resolve `host`; every address must be allowed (one bad record refuses the host). Returns one to dial."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ApiError("image_fetch_failed", f"cannot resolve image host {host!r}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    refused = [str(a) for a in addresses if not address_allowed(a, policy.allow_networks)]
    if refused or not addresses:
        raise ApiError("url_not_allowed", f"image host {host!r} resolves to a non-public address "
                                          f"({', '.join(refused) or 'none'}); not fetched")
    return str(addresses[0])


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that was checked, not to whatever a second DNS lookup returns."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        self._ssl_context = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._ssl_context)
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._ssl_context.wrap_socket(sock, server_hostname=self.host)  # SNI + cert check on the name


def fetch_url(url: str, policy: ImagePolicy, *, deadline: float | None = None) -> bytes:
    for _ in range(policy.max_redirects + 1):
        conn, response = _open(url, policy, deadline)
        try:
            if response.status in REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise ApiError("image_fetch_failed", f"image URL answered HTTP {response.status} without a "
                                                         "Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise ApiError("image_fetch_failed", f"image URL answered HTTP {response.status}")
            return _read_capped(response, _content_length(response.getheader("Content-Length")), policy, deadline)
        except (OSError, http.client.HTTPException) as e:
            raise _fetch_error(e) from None
        finally:
            conn.close()
    raise ApiError("image_fetch_failed", f"image URL redirected more than {policy.max_redirects} times")


def _open(url: str, policy: ImagePolicy, deadline: float | None):
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ApiError("url_not_allowed", f"image URL scheme {scheme!r} is not allowed (http and https only)")
    try:
        host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise ApiError("url_not_allowed", "image URL has an invalid port") from None
    if not host:
        raise ApiError("url_not_allowed", "image URL has no host")
    address = resolve_checked(host, port, policy)
    cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    conn = cls(host, port, address, timeout=_timeout(policy, deadline))
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", path, headers={"User-Agent": "llava-sagemaker-serve", "Accept": "image/*",
                                           "Accept-Encoding": "identity"})
        return conn, conn.getresponse()
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise _fetch_error(e) from None


def _timeout(policy: ImagePolicy, deadline: float | None) -> float:
    remaining = policy.fetch_timeout_s if deadline is None else deadline - time.monotonic()
    if remaining <= 0:
        raise ApiError("timeout", "the request ran out of its time budget while fetching the image")
    return min(policy.fetch_timeout_s, remaining)


def _content_length(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


def _read_capped(stream: Any, declared: int | None, policy: ImagePolicy, deadline: float | None) -> bytes:
    """Read at most policy.max_bytes, refusing as soon as the declared or streamed size passes it."""
    if declared is not None and declared > policy.max_bytes:
        raise ApiError("image_too_large", f"image is {declared} bytes; the limit is {policy.max_bytes}")
    buf = bytearray()
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise ApiError("timeout", "the request ran out of its time budget while fetching the image")
        chunk = stream.read(CHUNK)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > policy.max_bytes:
            raise ApiError("image_too_large", f"image is over the {policy.max_bytes}-byte limit")


def _fetch_error(e: BaseException) -> ApiError:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return ApiError("image_fetch_failed", "image fetch timed out")
    if isinstance(e, ssl.SSLError):
        return ApiError("image_fetch_failed", "TLS handshake with the image host failed")
    return ApiError("image_fetch_failed", f"image fetch failed ({type(e).__name__})")


# ---------------------------------------------------------------------------------------------- S3
def fetch_s3(uri: str, policy: ImagePolicy, *, deadline: float | None = None) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    parts = urlsplit(uri)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if not bucket or not key:
        raise ApiError("url_not_allowed", "an S3 image must be s3://bucket/key")
    if policy.s3_buckets is not None and bucket not in policy.s3_buckets:
        # Checked before any AWS call: the endpoint's role may read far more than callers should see through it.
        raise ApiError("url_not_allowed", f"s3://{bucket}/ is not a bucket this endpoint reads images from"
                                          if policy.s3_buckets else "this endpoint reads no s3:// images")
    _timeout(policy, deadline)  # refuse at once when the budget is already spent
    client = _s3_client(policy.fetch_timeout_s)
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
        body = obj["Body"]
        try:
            return _read_capped(body, obj.get("ContentLength"), policy, deadline)
        finally:
            body.close()
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "error")
        raise ApiError("image_fetch_failed", f"cannot read {uri}: {code}") from None
    except (BotoCoreError, OSError) as e:
        raise ApiError("image_fetch_failed", f"cannot read {uri} ({type(e).__name__})") from None


@functools.lru_cache(maxsize=8)
def _s3_client(timeout_s: float):
    """One thread-safe client per timeout; the endpoint, region and credentials come from the usual AWS env."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                                            retries={"max_attempts": 2, "mode": "standard"}))
