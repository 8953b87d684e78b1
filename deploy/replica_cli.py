"""``rmiot db replica create|status|drop|sync|async`` and ``rmiot db failover``.

- ``replica create [--sync|--async] [--port N] [--rebuild]``: a streaming
  standby of the private cluster under ``<data_dir>/pg-replica``
  (``database.replica_port``; synchronous unless ``database.replica_sync =
  false`` or ``--async``). After a failover, ``--rebuild`` makes the fenced
  former primary the new standby.
- ``replica status [--json]``: each node's role and replication figures.
- ``replica sync`` / ``replica async``: switch the commit mode now.
- ``replica drop``: the primary stops waiting for it, then it is removed.
- ``failover``: fence the primary and promote the standby now;
  ``failover --watch [--grace S]`` waits and does it once the primary has not
  answered for S seconds (default 3).

The trade-offs are in ``rmiot.deploy.replica``. Exit codes follow ``rmiot``:
0 done, 1 failed (one line says why), 3 ``status`` found a node down.

Wiring: ``add_db_arguments(parser)`` adds the arguments to the parser of
``rmiot db`` (whose ``action`` gains ``replica`` and ``failover``), and
``main(cfg, args)`` runs them. Standalone:
``python -m rmiot.deploy.replica_cli [--config PATH] replica status``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import psycopg

from rmiot.config import Config, ConfigError, load
from rmiot.deploy import cluster, replica

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DOWN = 0, 1, 2, 3
ACTIONS = ("replica", "failover")
REPLICA_ACTIONS = ("create", "status", "drop", "sync", "async")


def add_db_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``rmiot db replica ...`` and ``rmiot db failover``."""
    parser.add_argument("what", nargs="?", choices=REPLICA_ACTIONS,
                        help="with replica: create, status, drop, or switch to sync/async")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sync", dest="sync", action="store_true", default=None,
                      help="replica create: commits wait for the standby (default: "
                           "database.replica_sync)")
    mode.add_argument("--async", dest="sync", action="store_false",
                      help="replica create: commits do not wait for the standby")
    parser.add_argument("--port", type=int, help="replica create: the standby's port "
                        "(default: database.replica_port)")
    parser.add_argument("--rebuild", action="store_true",
                        help="replica create: rebuild the fenced former primary as the standby")
    parser.add_argument("--json", action="store_true", help="replica status: JSON")
    parser.add_argument("--watch", action="store_true",
                        help="failover: wait, and fail over when the primary stops answering")
    parser.add_argument("--grace", type=float, default=3.0, metavar="S",
                        help="failover --watch: seconds without an answer (default 3)")


def main(cfg: Config, args: argparse.Namespace) -> int:
    if not cfg.database.private:
        print("rmiot: replicas and failover here manage the private cluster; with "
              "database.dsn, use the server's own tools (Patroni...)", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _run(cfg, args)
    except (replica.ReplicaError, cluster.ClusterError, psycopg.Error) as exc:
        print(f"rmiot: {str(exc).strip()}", file=sys.stderr)
        return EXIT_FAILED


def _run(cfg: Config, args: argparse.Namespace) -> int:
    if args.action == "failover":
        result = replica.watch(cfg, args.grace) if args.watch else replica.failover(cfg)
        if result is None:
            return EXIT_OK
        print(f"failed over in {result.seconds:.2f} s: {result.new_primary} is the primary; "
              f"{result.old_primary} is fenced (rebuild it as the replica with "
              "'rmiot db replica create --rebuild')")
        return EXIT_OK
    what = args.what or "status"
    if what == "create":
        rec = replica.create(cfg, sync=args.sync, port=args.port, rebuild=args.rebuild)
        print(f"{rec.name} streams on port {rec.port}, "
              f"{'synchronous' if rec.sync else 'asynchronous'}")
    elif what in ("sync", "async"):
        replica.set_mode(cfg, what == "sync")
        print(f"the replica is {'synchronous' if what == 'sync' else 'asynchronous'}")
    elif what == "drop":
        dropped = replica.drop(cfg)
        print(f"dropped {', '.join(dropped)}" if dropped else "there is no replica")
    else:
        nodes = replica.status(cfg)
        if args.json:
            print(json.dumps([asdict(n) for n in nodes], default=str))
        else:
            for n in nodes:
                state = "running" if n.running else "DOWN"
                print(f"{n.name:<12} port {n.port:<6} {n.role:<8} {state:<8} "
                      + " ".join(f"{k}={v}" for k, v in n.detail.items()))
        down = [n for n in nodes if n.role != "fenced" and not n.running]
        return EXIT_DOWN if down else EXIT_OK
    return EXIT_OK


def _standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rmiot.deploy.replica_cli",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file")
    parser.add_argument("action", choices=ACTIONS)
    add_db_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main(load(args.config), args)
    except ConfigError as exc:
        print(f"rmiot: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(_standalone())
