"""S3 bucket names and s3:// URIs, checked against AWS's naming rules so a bad one is refused with the reason.

    bucket_name_problem("My_Bucket")    # -> "may hold only lowercase letters, digits, dots and hyphens (not 'M', '_')"
    s3_uri_problem("s3://my-bucket/x")  # -> None

The rules are those of general purpose buckets ("Bucket naming rules" in the Amazon S3 user guide): 3-63
characters; lowercase letters, digits, dots and hyphens; a letter or digit first and last; no two dots in a row;
not an IP address; none of the prefixes and suffixes AWS reserves for other kinds of bucket and alias.
Standard library only.
"""

from __future__ import annotations

import re

S3_URI_MAX = 1024  # SageMaker's S3Uri fields hold at most 1024 characters
ALLOWED = re.compile(r"^[a-z0-9.-]+$")
IP_ADDRESS = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
# Access point aliases, Object Lambda access point aliases, Multi-Region Access Points, directory buckets, S3 Tables.
RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def bucket_name_problem(name: str) -> str | None:
    """What makes `name` an invalid S3 bucket name (the first rule it breaks), or None for a valid name."""
    if not 3 <= len(name) <= 63:
        return f"must be 3-63 characters long (it has {len(name)})"
    if not ALLOWED.match(name):
        bad = sorted({c for c in name if not re.match(r"[a-z0-9.-]", c)})
        return f"may hold only lowercase letters, digits, dots and hyphens (not {', '.join(map(repr, bad))})"
    if not (name[0].isalnum() and name[-1].isalnum()):
        return "must begin and end with a letter or digit"
    if ".." in name:
        return "must not hold two dots in a row"
    if IP_ADDRESS.match(name):
        return "must not be formatted as an IP address"
    for prefix in RESERVED_PREFIXES:
        if name.startswith(prefix):
            return f"must not begin with {prefix!r} (reserved by AWS)"
    for suffix in RESERVED_SUFFIXES:
        if name.endswith(suffix):
            return f"must not end with {suffix!r} (reserved by AWS)"
    return None


def s3_uri_problem(uri: str) -> str | None:
    """What makes `uri` an invalid s3://bucket[/key] URI, or None."""
    if not uri.startswith("s3://"):
        return "it must start with s3://"
    if len(uri) > S3_URI_MAX:
        return f"it is longer than {S3_URI_MAX} characters"
    bucket = uri[len("s3://"):].split("/", 1)[0]
    if not bucket:
        return "it names no bucket"
    problem = bucket_name_problem(bucket)
    return f"bucket name {bucket!r} {problem}" if problem else None
