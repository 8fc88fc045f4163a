"""Process launch: every GPU of every SageMaker instance trains, one process per GPU.

`python -m train` started directly (SageMaker's `docker run IMAGE train`) re-executes itself under torchrun when
there is more than one GPU or more than one host; node rank and master address come from
`/opt/ml/input/config/resourceconfig.json` (hosts sorted, the first is the master) and NCCL uses the network
interface SageMaker names there. A process already started by torchrun or the deepspeed launcher (RANK set) is
never relaunched. A single process that uses DeepSpeed gets the rendezvous variables DeepSpeed would otherwise look
for through MPI.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping, MutableMapping, Sequence

from train.sagemaker_env import ResourceConfig

log = logging.getLogger(__name__)

MASTER_PORT = 29500
RANK_SHUTDOWN_S = 100  # of the 120 s SageMaker waits between SIGTERM and SIGKILL
LAUNCHED_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def already_launched(env: Mapping[str, str]) -> bool:
    return any(v in env for v in LAUNCHED_VARS)


def torchrun_command(argv: Sequence[str], *, gpus: int, resource: ResourceConfig | None,
                     env: Mapping[str, str]) -> list[str] | None:
    """The torchrun command line that runs `python -m train argv` on all GPUs and hosts, or None if one process
    is all there is (or a launcher already started us)."""
    if already_launched(env):
        return None
    nnodes = len(resource.hosts) if resource else 1
    nproc = max(gpus, 1)
    if nnodes == 1 and nproc == 1:
        return None
    # On SIGTERM torchrun forwards it and SIGKILLs the ranks after --shutdown-timeout (30 s by default); SageMaker
    # kills the container 120 s after its SIGTERM: leave the ranks most of that to save their checkpoint.
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
           f"--shutdown-timeout={RANK_SHUTDOWN_S}"]
    if nnodes > 1:
        cmd += [f"--node_rank={resource.node_rank}", f"--master_addr={resource.master_host}",
                f"--master_port={MASTER_PORT}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "train", *argv]


def launch_env(resource: ResourceConfig | None, env: Mapping[str, str]) -> dict[str, str]:
    """The environment for torchrun: NCCL on SageMaker's inter-node interface when there are several hosts."""
    out = dict(env)
    if resource and len(resource.hosts) > 1 and resource.network_interface_name:
        out.setdefault("NCCL_SOCKET_IFNAME", resource.network_interface_name)
        out.setdefault("GLOO_SOCKET_IFNAME", resource.network_interface_name)
    return out


def relaunch_if_needed(argv: Sequence[str], resource: ResourceConfig | None) -> None:
    """Replace this process by torchrun when more processes are needed; return when this one should train."""
    import torch

    gpus = torch.cuda.device_count()
    cmd = torchrun_command(argv, gpus=gpus, resource=resource, env=os.environ)
    if cmd is None:
        return
    log.info("launching %d process(es) per node on %d node(s): %s", max(gpus, 1),
             len(resource.hosts) if resource else 1, " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: SageMaker's SIGTERM (stop, spot interruption) must reach torchrun, which forwards it.
    os.execve(sys.executable, cmd, launch_env(resource, os.environ))


def ensure_rendezvous_env(env: MutableMapping[str, str]) -> None:
    """One process with DeepSpeed: set what torchrun would have set (else DeepSpeed falls back to MPI discovery)."""
    if already_launched(env):
        return
    env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_rank(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("RANK", "0"))
