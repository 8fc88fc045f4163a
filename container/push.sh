#!/usr/bin/env bash
# Pushes a locally built image to Amazon ECR: resolves account and region, creates the repository if asked, logs the
# engine in with a fresh ECR token, tags and pushes, and prints the image URI for `llava-sm submit/deploy --image-uri`.
#
#   container/push.sh llava-sm-serve:latest --create
#   container/push.sh llava-sm-train:latest --repository llava/train --tag v3 --region eu-west-1 --account 123456789012
#
# Options:
#   --repository NAME   ECR repository (default: the local image's name, e.g. llava-sm-serve)
#   --tag TAG           remote tag (default: the local image's tag)
#   --region REGION     default: $AWS_REGION, $AWS_DEFAULT_REGION, then the AWS config (profile) region
#   --account ID        default: the caller's account (STS GetCallerIdentity)
#   --profile NAME      AWS profile (else $AWS_PROFILE / the default credentials chain)
#   --create            create the repository when it does not exist (scan on push, immutable tags off)
#   --engine E          docker or podman (default: $CONTAINER_ENGINE, else the first of docker and podman that answers)
#   --dry-run           resolve everything (AWS calls included) and print the engine commands instead of running them
# AWS calls go through boto3 (a project dependency): run from the project's venv, or set PYTHON.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
die() { echo "push.sh: $*" >&2; exit 2; }

image="" repository="" tag="" region="" account="" profile="" create=0 engine=${CONTAINER_ENGINE:-} dry_run=0
while [ "$#" -gt 0 ]; do
    case "$1" in
        --repository) repository=${2:?--repository needs a value}; shift ;;
        --tag) tag=${2:?--tag needs a value}; shift ;;
        --region) region=${2:?--region needs a value}; shift ;;
        --account) account=${2:?--account needs a value}; shift ;;
        --profile) profile=${2:?--profile needs a value}; shift ;;
        --create) create=1 ;;
        --engine) engine=${2:?--engine needs a value}; shift ;;
        --dry-run) dry_run=1 ;;
        -h | --help) usage 0 ;;
        -*) echo "push.sh: unknown option: $1" >&2; usage ;;
        *) [ -z "$image" ] || die "one image at a time (got $image and $1)"; image=$1 ;;
    esac
    shift
done
[ -n "$image" ] || { echo "push.sh: which local image? e.g. llava-sm-serve:latest" >&2; usage; }

# shellcheck source=container/engine.sh
. "$(dirname "$0")/engine.sh"
pick_engine docker podman
[ -n "$engine" ] || [ "$dry_run" = 0 ] || engine=docker
check_engine docker podman

last=${image##*/}  # name[:tag], without a registry host (which may have a :port)
if [[ $last == *:* ]]; then
    local_name=${image%:*} local_tag=${last##*:}
else
    local_name=$image local_tag=latest image="$image:latest"
fi
repository=${repository:-${local_name##*/}}
tag=${tag:-$local_tag}

# One boto3 call site: prints "<registry> <password>" after creating the repository when asked.
resolved=$("${PYTHON:-python3}" - "$region" "$account" "$profile" "$repository" "$create" <<'PY'
import base64, sys
import boto3
from botocore.exceptions import BotoCoreError, ClientError

region, account, profile, repository, create = sys.argv[1:]
try:
    session = boto3.Session(profile_name=profile or None, region_name=region or None)
    region = session.region_name
    if not region:
        sys.exit("push.sh: no AWS region: pass --region or set AWS_REGION / a profile region")
    account = account or session.client("sts").get_caller_identity()["Account"]
    ecr = session.client("ecr", region_name=region)
    try:
        ecr.describe_repositories(registryId=account, repositoryNames=[repository])
    except ecr.exceptions.RepositoryNotFoundException:
        if create != "1":
            sys.exit(f"push.sh: ECR repository {repository!r} does not exist in {account}/{region}; "
                     "pass --create to create it")
        ecr.create_repository(repositoryName=repository, imageScanningConfiguration={"scanOnPush": True})
        print(f"push.sh: created ECR repository {repository}", file=sys.stderr)
    token = ecr.get_authorization_token(registryIds=[account])["authorizationData"][0]["authorizationToken"]
except (BotoCoreError, ClientError) as e:
    sys.exit(f"push.sh: AWS error: {e}")
_user, _, password = base64.b64decode(token).decode().partition(":")
print(f"{account}.dkr.ecr.{region}.amazonaws.com {password}")
PY
)
registry=${resolved%% *}
password=${resolved#* }
remote="$registry/$repository:$tag"

run() {
    if [ "$dry_run" = 1 ]; then echo "+ $*"; else "$@"; fi
}
if [ "$dry_run" = 1 ]; then
    echo "+ $engine login --username AWS --password-stdin $registry"
else
    printf '%s' "$password" | "$engine" login --username AWS --password-stdin "$registry"
fi
run "$engine" tag "$image" "$remote"
run "$engine" push "$remote"
echo "$remote"
