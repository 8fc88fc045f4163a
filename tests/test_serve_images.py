"""serve/engine/images.py: every image source and its safety rules.

Decoding (base64 forms, data: URIs, pixel caps before decoding, every PIL mode to RGB, animations, EXIF), URL
fetches against a real HTTP server on 127.0.0.1 (loopback refused by default and allowed by the allow-list;
169.254.169.254 and other private addresses refused before connecting; redirects re-checked; size caps while
streaming; timeouts), and s3:// reads against a real moto server.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from serve_support import png_bytes

from serve.config import ServeConfig
from serve.engine.errors import ApiError
from serve.engine.images import ImagePolicy, address_allowed, decode_image, load_image

LOOPBACK = ImagePolicy(allow_networks=ServeConfig.from_env({"SERVE_FETCH_ALLOW_NETWORKS": "127.0.0.1/32"})
                       .fetch_allow_networks, fetch_timeout_s=2.0)


def code_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    return info.value.code


def encoded(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("form", ["standard", "urlsafe", "newlines", "unpadded", "data-uri", "data-uri-upper"])
def test_base64_forms_decode(form):
    raw = png_bytes((33, 17), (10, 250, 60))
    text = {"standard": base64.b64encode(raw).decode(),
            "urlsafe": base64.urlsafe_b64encode(raw).decode(),
            "newlines": base64.encodebytes(raw).decode(),
            "unpadded": base64.b64encode(raw).decode().rstrip("="),
            "data-uri": "data:image/png;base64," + base64.b64encode(raw).decode(),
            "data-uri-upper": "DATA:image/png;BASE64," + base64.b64encode(raw).decode()}[form]
    img = load_image(text, ImagePolicy())
    assert img.mode == "RGB" and img.size == (33, 17) and img.getpixel((0, 0)) == (10, 250, 60)


@pytest.mark.parametrize("ref, code", [
    ("not base64 at all!", "invalid_image"),
    (base64.b64encode(b"just some text, not an image").decode(), "invalid_image"),
    (base64.b64encode(png_bytes()[:60]).decode(), "invalid_image"),  # truncated PNG
    ("   ", "invalid_image"),
    ("data:image/png;base64", "invalid_image"),
    ("/etc/passwd", "invalid_image"),  # a local path is never opened
    ("file:///etc/passwd", "url_not_allowed"),
    ("ftp://example.com/a.png", "url_not_allowed"),
    ("gopher://127.0.0.1:70/_x", "url_not_allowed"),
    ("s3://bucket-only", "url_not_allowed"),
])
def test_bad_references_are_refused(ref, code):
    assert code_of(load_image, ref, ImagePolicy()) == code


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_cap_is_checked_before_decoding():
    bomb = encoded(Image.new("1", (10_000, 10_000)))  # 100 Mpixel, ~12 kB of PNG
    assert len(bomb) < 100_000
    started = time.perf_counter()
    assert code_of(decode_image, bomb, 25_000_000) == "image_too_large"
    assert time.perf_counter() - started < 1.0  # refused from the header, not decoded
    assert code_of(decode_image, png_bytes((100, 100)), 9_999) == "image_too_large"
    assert decode_image(png_bytes((100, 100)), 10_000).size == (100, 100)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    img = decode_image(encoded(rgba), 1000)
    assert img.mode == "RGB" and img.getpixel((1, 1)) == (255, 255, 255) and img.getpixel((0, 0)) == (255, 0, 0)

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 1
    assert decode_image(encoded(palette, transparency=1), 1000).getpixel((2, 2)) == (255, 255, 255)
    assert decode_image(encoded(Image.new("LA", (3, 3), (50, 255))), 100).getpixel((0, 0)) == (50, 50, 50)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    import numpy as np

    arr = np.full((4, 4), 32896, dtype=np.uint16)  # half scale: 128 * 257
    img = decode_image(encoded(Image.fromarray(arr)), 100)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("mode, fmt, colour", [
    ("CMYK", "JPEG", (0, 255, 255, 0)), ("L", "PNG", 77), ("1", "PNG", 1), ("P", "GIF", 3),
    ("RGB", "WEBP", (1, 2, 250)), ("RGB", "BMP", (9, 8, 7)), ("I;16", "TIFF", 1000),
])
def test_every_mode_becomes_rgb(mode, fmt, colour):
    img = decode_image(encoded(Image.new(mode, (8, 6), colour), fmt), 1000)
    assert img.mode == "RGB" and img.size == (8, 6)


def test_animation_gives_its_first_frame():
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    img = decode_image(gif, 100)
    assert img.mode == "RGB" and img.getpixel((3, 3))[0] > 200


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    jpeg = encoded(Image.new("RGB", (40, 20), (0, 128, 0)), "JPEG", exif=exif)
    assert decode_image(jpeg, 10_000).size == (20, 40)


# ------------------------------------------------------------------------------------------------ URL fetch
class _Handler(BaseHTTPRequestHandler):
    hits: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        _Handler.hits.append(self.path)
        routes = {
            "/img.png": lambda: self._send(200, png_bytes((20, 10), (1, 2, 3))),
            "/text": lambda: self._send(200, b"<html>not an image</html>", "text/html"),
            "/missing": lambda: self._send(404, b"nope", "text/plain"),
            "/relative-redirect": lambda: self._redirect("/img.png"),
            "/to-metadata": lambda: self._redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-private": lambda: self._redirect("http://10.0.0.5/img.png"),
            "/loop": lambda: self._redirect("/loop"),
            "/big-declared": lambda: self._send(200, b"\0" * 5000),
            "/big-streamed": self._stream_forever,
            "/slow": self._slow,
        }
        routes.get(self.path.split("?")[0], lambda: self._send(404, b""))()

    def _send(self, status, body, ctype="image/png"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream_forever(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for _ in range(1000):  # no Content-Length: only the streamed count can stop it
                self.wfile.write(b"\0" * 1024)
        except OSError:
            pass

    def _slow(self):
        time.sleep(3)
        self._send(200, png_bytes())


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients that stop reading early are expected here
        pass


@pytest.fixture(scope="module")
def http_server():
    server = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_loopback_is_refused_by_default_without_connecting(http_server):
    _Handler.hits.clear()
    assert code_of(load_image, http_server + "/img.png", ImagePolicy()) == "url_not_allowed"
    assert _Handler.hits == []


def test_loopback_is_fetched_when_the_allow_list_names_it(http_server):
    img = load_image(http_server + "/img.png?x=1", LOOPBACK)
    assert img.size == (20, 10) and img.getpixel((0, 0)) == (1, 2, 3)
    assert load_image(http_server + "/relative-redirect", LOOPBACK).size == (20, 10)


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://10.0.0.1/a.png", "http://192.168.1.1/a.png", "http://172.16.0.1/a.png", "http://100.64.0.1/a.png",
    "http://0.0.0.0/a.png", "http://[::1]/a.png", "http://[::ffff:127.0.0.1]/a.png", "http://224.0.0.1/a.png",
    "https://localhost/a.png",
])
def test_non_public_addresses_are_refused(url):
    assert code_of(load_image, url, ImagePolicy()) == "url_not_allowed"


def test_address_rules():
    import ipaddress

    assert address_allowed(ipaddress.ip_address("8.8.8.8"))
    assert not address_allowed(ipaddress.ip_address("169.254.169.254"))
    assert address_allowed(ipaddress.ip_address("10.9.8.7"), (ipaddress.ip_network("10.0.0.0/8"),))
    assert not address_allowed(ipaddress.ip_address("::ffff:10.9.8.7"))


@pytest.mark.parametrize("path", ["/to-metadata", "/to-private"])
def test_redirects_are_rechecked(http_server, path):
    assert code_of(load_image, http_server + path, LOOPBACK) == "url_not_allowed"


@pytest.mark.parametrize("path, policy, code", [
    ("/loop", LOOPBACK, "image_fetch_failed"),
    ("/missing", LOOPBACK, "image_fetch_failed"),
    ("/text", LOOPBACK, "invalid_image"),
    ("/big-declared", ImagePolicy(max_bytes=4096, allow_networks=LOOPBACK.allow_networks), "image_too_large"),
    ("/big-streamed", ImagePolicy(max_bytes=4096, allow_networks=LOOPBACK.allow_networks), "image_too_large"),
])
def test_fetch_failures(http_server, path, policy, code):
    assert code_of(load_image, http_server + path, policy) == code


def test_fetch_times_out(http_server):
    policy = ImagePolicy(fetch_timeout_s=0.3, allow_networks=LOOPBACK.allow_networks)
    started = time.monotonic()
    assert code_of(load_image, http_server + "/slow", policy) == "image_fetch_failed"
    assert time.monotonic() - started < 2
    assert code_of(load_image, http_server + "/img.png", LOOPBACK, deadline=time.monotonic() - 1) == "timeout"


def test_connection_refused_is_a_fetch_failure():
    from serve_support import free_port

    assert code_of(load_image, f"http://127.0.0.1:{free_port()}/a.png", LOOPBACK) == "image_fetch_failed"


# ------------------------------------------------------------------------------------------------ S3
@pytest.fixture
def s3_bucket(moto_server, monkeypatch):
    import boto3

    from serve.engine import images

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    images._s3_client.cache_clear()
    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="serve-images")
    s3.put_object(Bucket="serve-images", Key="charts/a.png", Body=png_bytes((30, 20), (5, 6, 7)))
    s3.put_object(Bucket="serve-images", Key="big.bin", Body=b"\0" * 8192)
    yield "serve-images"
    images._s3_client.cache_clear()


def test_s3_images_are_read_with_boto3(s3_bucket):
    img = load_image(f"s3://{s3_bucket}/charts/a.png", ImagePolicy())
    assert img.size == (30, 20) and img.getpixel((0, 0)) == (5, 6, 7)


def test_s3_failures(s3_bucket):
    assert code_of(load_image, f"s3://{s3_bucket}/charts/missing.png", ImagePolicy()) == "image_fetch_failed"
    assert code_of(load_image, "s3://no-such-bucket/a.png", ImagePolicy()) == "image_fetch_failed"
    assert code_of(load_image, f"s3://{s3_bucket}/big.bin", ImagePolicy(max_bytes=4096)) == "image_too_large"


def test_s3_reads_only_the_allowed_buckets(s3_bucket, moto_server):
    """SERVE_S3_BUCKETS: a readable bucket outside the list is refused before any AWS call."""
    import boto3

    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="private-data")
    boto3.client("s3", endpoint_url=moto_server).put_object(Bucket="private-data", Key="secret.png",
                                                             Body=png_bytes((8, 8)))
    only_ours = ImagePolicy(s3_buckets=(s3_bucket, "another-bucket"))
    assert load_image(f"s3://{s3_bucket}/charts/a.png", only_ours).size == (30, 20)
    assert load_image("s3://private-data/secret.png", ImagePolicy()).size == (8, 8)  # the role could read it
    with pytest.raises(ApiError) as e:
        load_image("s3://private-data/secret.png", only_ours)
    assert e.value.code == "url_not_allowed" and "s3://private-data/ is not a bucket" in e.value.message
    with pytest.raises(ApiError) as e:
        load_image(f"s3://{s3_bucket}/charts/a.png", ImagePolicy(s3_buckets=()))
    assert e.value.code == "url_not_allowed" and "no s3:// images" in e.value.message
