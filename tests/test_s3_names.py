"""S3 bucket names and s3:// URIs: each of AWS's bucket naming rules refused with its reason, valid names kept;
the reason reaches `llava-sm` users and the server's SERVE_S3_BUCKETS check."""

from __future__ import annotations

import pytest

from core.s3 import bucket_name_problem, s3_uri_problem


@pytest.mark.parametrize("name", ["abc", "my-bucket", "my.bucket.2024", "a" * 63, "0bucket9", "a-b.c-d",
                                  "xn-bucket", "s3alias-bucket", "bucket-s3alia", "192.168.5.4a"])
def test_valid_bucket_names(name):
    assert bucket_name_problem(name) is None


@pytest.mark.parametrize("name, reason", [
    ("ab", "must be 3-63 characters long (it has 2)"),
    ("a" * 64, "must be 3-63 characters long (it has 64)"),
    ("My-Bucket", "may hold only lowercase letters, digits, dots and hyphens (not 'B', 'M')"),
    ("my_bucket", "(not '_')"),
    ("my bucket", "(not ' ')"),
    ("-bucket", "must begin and end with a letter or digit"),
    ("bucket-", "must begin and end with a letter or digit"),
    (".bucket", "must begin and end with a letter or digit"),
    ("bucket.", "must begin and end with a letter or digit"),
    ("my..bucket", "must not hold two dots in a row"),
    ("192.168.5.4", "must not be formatted as an IP address"),
    ("xn--bucket", "must not begin with 'xn--' (reserved by AWS)"),
    ("sthree-bucket", "must not begin with 'sthree-'"),
    ("amzn-s3-demo-bucket", "must not begin with 'amzn-s3-demo-'"),
    ("bucket-s3alias", "must not end with '-s3alias' (reserved by AWS)"),
    ("bucket--ol-s3", "must not end with '--ol-s3'"),
    ("bucket.mrap", "must not end with '.mrap'"),
    ("bucket--x-s3", "must not end with '--x-s3'"),
    ("bucket--table-s3", "must not end with '--table-s3'"),
])
def test_each_naming_rule_says_what_is_wrong(name, reason):
    assert reason in bucket_name_problem(name)


@pytest.mark.parametrize("uri, reason", [
    ("s3://my-bucket", None),
    ("s3://my-bucket/a/b.tar.gz", None),
    ("my-bucket/data", "it must start with s3://"),
    ("S3://my-bucket/data", "it must start with s3://"),
    ("s3:///data", "it names no bucket"),
    ("s3://my-bucket/" + "k" * 1010, "it is longer than 1024 characters"),
    ("s3://My_Bucket/data", "bucket name 'My_Bucket' may hold only lowercase letters"),
    ("s3://xn--idn/data", "bucket name 'xn--idn' must not begin with 'xn--'"),
])
def test_s3_uris(uri, reason):
    problem = s3_uri_problem(uri)
    assert problem == reason if reason is None else reason in problem


def test_the_cli_and_the_server_give_the_reason(capsys):
    from client.cli import main
    from serve.config import ConfigError, ServeConfig

    rc = main(["submit", "--dry-run", "--image-uri", "123456789012.dkr.ecr.us-east-1.amazonaws.com/x:1",
               "--role", "arn:aws:iam::123456789012:role/R", "--train", "s3://my..bucket/d/",
               "--output-path", "s3://out-s3alias/o/"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "train: 's3://my..bucket/d/' is not an S3 URI (s3://bucket/prefix): bucket name 'my..bucket' must not " \
           "hold two dots in a row" in err
    assert "output_path: 's3://out-s3alias/o/' is not an S3 URI" in err and "must not end with '-s3alias'" in err
    with pytest.raises(ConfigError, match=r"SERVE_S3_BUCKETS: not S3 bucket names: 10\.0\.0\.1 \(must not be "
                                          r"formatted as an IP address\)"):
        ServeConfig.from_env({"SERVE_S3_BUCKETS": "ok-bucket,10.0.0.1"})
