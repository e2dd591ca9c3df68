"""embed_server: run a real tritonserver on our model repository, without Docker.

`embed-server` (cli.py) for people; `start_server(repo, ...)` (launcher.py) for tests and
demos; `assemble_repository(out, checkpoints)` (repository.py) to build a repository.
Standard library only (tritonserver itself comes from nvidia-pytriton or an install).
"""
from .launcher import LaunchError, ServerOptions, TritonServer, free_ports, start_server
from .repository import assemble_repository

__all__ = ["LaunchError", "ServerOptions", "TritonServer", "free_ports", "start_server", "assemble_repository"]
